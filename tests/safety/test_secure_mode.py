"""secure_mode: noise and batches that no torch seed can replay, with the right distribution."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.data import PoissonBatchSampler, secure_poisson_indices
from dpcompile.noise import NoiseSource

D = torch.float64


def one_run(secure, seed=0, sigma=1.5, bound=0.5):
    """One step on a 100x100 linear layer; returns (update, batch indices seen, privacy)."""
    torch.manual_seed(seed)
    model = torch.nn.Linear(100, 100).to(D)
    x, y = torch.randn(64, 100, dtype=D), torch.randn(64, 100, dtype=D)
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    private, opt, dl = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(TensorDataset(x, y), batch_size=16),
        noise_multiplier=sigma, max_grad_norm=bound, backend="eager", secure_mode=secure,
    )
    torch.manual_seed(seed)
    bx, by = next(iter(dl))
    opt.zero_grad()
    F.mse_loss(private(bx), by).backward()
    opt.step()
    update = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    return update, bx, private.privacy


def test_default_mode_is_reproducible_and_secure_mode_is_not():
    a, xa, _ = one_run(secure=False)
    b, xb, _ = one_run(secure=False)
    assert torch.equal(a, b) and torch.equal(xa, xb)
    c, xc, _ = one_run(secure=True)
    d, xd, _ = one_run(secure=True)
    assert not torch.equal(c, d)
    assert not torch.equal(c, a)


def test_secure_noise_has_the_claimed_spread():
    """Secure standard normals: mean 0, variance 1, fourth moment 3 (200,000 draws)."""
    torch.manual_seed(0)
    noise = NoiseSource(secure=True)
    draws = noise.normal_like([torch.empty(200_000, dtype=D)])[0]
    assert abs(draws.mean().item()) < 5 / math.sqrt(200_000)
    assert abs(draws.std().item() - 1) < 0.01
    # Fourth moment of a normal is 3: the sum of 4 normals is still Gaussian.
    assert abs((draws**4).mean().item() - 3) < 0.1


def test_secure_noise_through_dp_compile():
    """Noise against an exact σ=0 replay of the same batch: std σ·C/(qN) per coordinate, ±5%."""
    update, bx, privacy = one_run(secure=True, sigma=1.5)
    # Exact σ=0 baseline for the same batch: replay the same step without noise.
    torch.manual_seed(0)
    model = torch.nn.Linear(100, 100).to(D)
    start = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(64, 100, dtype=D), torch.randn(64, 100, dtype=D)
    rows = torch.stack([torch.nonzero((x == r).all(1)).reshape(-1)[0] for r in bx])
    private, opt, dl = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(TensorDataset(x, y), batch_size=16),
        noise_multiplier=0.0, max_grad_norm=0.5, backend="eager",
    )
    opt.zero_grad()
    F.mse_loss(private(x[rows]), y[rows]).backward()
    opt.step()
    clean = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
    spread = (update - clean).std().item()
    expected = 1.5 * 0.5 / privacy.expected_batch_size
    assert abs(spread / expected - 1) < 0.05, (spread, expected)


def test_secure_mode_refuses_a_seeded_noise_generator():
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,))), batch_size=2)
    with pytest.raises(ValueError, match="secure_mode"):
        dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                             noise_multiplier=1.0, secure_mode=True,
                             noise_generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="seed is known"):
        NoiseSource(secure=True, generator=torch.Generator())


def test_secure_sampler_is_poisson_and_independent_of_torch_seeds():
    n, q, draws = 500, 0.04, 2000
    sizes = []
    for _ in range(draws):
        torch.manual_seed(0)  # would freeze a torch-generator sampler
        sizes.append(len(secure_poisson_indices(n, q)))
    sizes_t = torch.tensor(sizes, dtype=D)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes_t.mean().item() - mean) < 4 * math.sqrt(var / draws)
    assert abs(sizes_t.var().item() / var - 1) < 0.15
    assert len(set(sizes)) > 10
    assert secure_poisson_indices(7, 1.0) == list(range(7))
    sampler = PoissonBatchSampler(n, q, steps=3, secure=True)
    batches = list(sampler)
    assert len(batches) == 3 and all(0 <= i < n for b in batches for i in b)
    assert all(state is None for _, state in sampler.drawn_states)  # nothing to checkpoint


def test_secure_loader_uses_the_os_sampler():
    _, _, privacy = one_run(secure=True)
    assert privacy.secure_mode
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,))), batch_size=2)
    _, _, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                    noise_multiplier=1.0, secure_mode=True, backend="eager")
    assert dl.batch_sampler.secure and dl.batch_sampler.generator is None
    list(dl)
    assert dl.batch_sampler.generator is None  # no torch generator was ever created
