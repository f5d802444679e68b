"""Noise of the private step: the compiled counter-based CPU path is the documented function of
the noise generator, Gaussian with the claimed spread, and torch's sampler serves everything else."""

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile import counter_noise
from dpcompile.noise import COUNTER_MIN_NUMEL, NoiseSource

SHAPES = [(300, 200), (200,), (64, 3, 5, 5)]  # 65,000 elements, above COUNTER_MIN_NUMEL


def sums(dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor]:
    """Tensors like clipped sums, one of them a transposed (non-contiguous) view."""
    g = torch.Generator().manual_seed(seed)
    first = torch.randn(SHAPES[0][::-1], generator=g, dtype=dtype).t()
    return [first] + [torch.randn(s, generator=g, dtype=dtype) for s in SHAPES[1:]]


def next_key(generator: torch.Generator) -> torch.Tensor:
    return torch.empty((), dtype=torch.int64).random_(generator=generator)


@pytest.mark.inductor
def test_compiled_noise_is_the_counter_stream_keyed_by_the_generator():
    assert sum(math.prod(s) for s in SHAPES) >= COUNTER_MIN_NUMEL
    source = NoiseSource(generator=torch.Generator().manual_seed(3), compiled=True)
    keys = torch.Generator().manual_seed(3)  # replays the keys the source draws
    for std, denominator in ((0.7, 16.0), (2.0, 1.0)):
        tensors = sums()
        before = [t.clone() for t in tensors]
        source.add_noise_(tensors, std, denominator)
        noise = counter_noise.normal_like(next_key(keys), before)
        for t, b, z in zip(tensors, before, noise):
            # float32 transcendentals: Inductor and eager differ by ~1 ulp of |z| <= 5.8
            torch.testing.assert_close(t, (b + std * z) / denominator, rtol=1e-5, atol=1e-5)
        assert not tensors[0].is_contiguous()  # written in place, layout kept


@pytest.mark.inductor
def test_compiled_noise_is_standard_normal_and_fresh_every_draw():
    torch.manual_seed(0)
    source = NoiseSource(compiled=True)
    draws = []
    for _ in range(2):
        zeros = [torch.zeros(s) for s in SHAPES]
        source.add_noise_(zeros, 1.0)
        draws.append(torch.cat([z.reshape(-1) for z in zeros]).double())
    z, other = draws
    n = z.numel()
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 0.03
    assert stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    assert abs(float(torch.corrcoef(torch.stack([z, other]))[0, 1])) < 0.02
    torch.manual_seed(0)  # torch's default generator keys it: the same seed, the same noise
    again = [torch.zeros(s) for s in SHAPES]
    NoiseSource(compiled=True).add_noise_(again, 1.0)
    assert torch.equal(torch.cat([a.reshape(-1) for a in again]).double(), z)


@pytest.mark.parametrize("compiled, dtype, shapes", [
    (False, torch.float32, SHAPES),  # backend="eager"
    (True, torch.float64, SHAPES),  # float64 noise keeps 53-bit uniforms
    (True, torch.float32, [(10, 10), (7,)]),  # too small to gain from a kernel call
])
def test_torch_sampler_serves_the_other_cases(compiled, dtype, shapes):
    source = NoiseSource(generator=torch.Generator().manual_seed(5), compiled=compiled)
    g = torch.Generator().manual_seed(5)
    tensors = [torch.ones(s, dtype=dtype) for s in shapes]
    source.add_noise_(tensors, 0.5, 4.0)
    expected = (1 + 0.5 * torch.randn(sum(math.prod(s) for s in shapes), generator=g, dtype=dtype)) / 4.0
    torch.testing.assert_close(torch.cat([t.reshape(-1) for t in tensors]), expected, rtol=0, atol=0)


def test_zero_std_only_divides_and_draws_nothing():
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    tensors = [torch.full((300, 200), 8.0)]
    NoiseSource(generator=g, compiled=True).add_noise_(tensors, 0.0, 4.0)
    assert torch.equal(tensors[0], torch.full((300, 200), 2.0))
    assert torch.equal(g.get_state(), state)


def test_dp_compile_compiles_noise_only_with_inductor():
    def noise_of(backend: str) -> NoiseSource:
        model = torch.nn.Linear(4, 2)
        loader = DataLoader(TensorDataset(torch.randn(8, 4), torch.randn(8, 2)), batch_size=4)
        _, optimizer, _ = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                               noise_multiplier=1.0, backend=backend)
        return optimizer.noise

    assert noise_of("inductor").compiled and not noise_of("eager").compiled


@pytest.mark.inductor
def test_float32_inductor_step_has_the_claimed_noise_spread():
    """A float32 step compiled by Inductor (counter-based noise) against the same batch replayed
    without noise: the difference has std σ·C/(qN) per coordinate, ±5%."""
    def update(sigma: float, backend: str) -> tuple[torch.Tensor, float]:
        torch.manual_seed(0)
        model = torch.nn.Linear(256, 256)
        x, y = torch.randn(32, 256), torch.randn(32, 256)
        start = [p.detach().clone() for p in model.parameters()]
        private, optimizer, _ = dpcompile.dp_compile(
            model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(TensorDataset(x, y), batch_size=32),
            noise_multiplier=sigma, max_grad_norm=0.5, backend=backend, poisson_sampling=False,
        )
        optimizer.zero_grad()
        F.mse_loss(private(x), y).backward()
        optimizer.step()
        moved = torch.cat([(p.detach() - s).reshape(-1) for p, s in zip(model.parameters(), start)])
        return moved, private.privacy.expected_batch_size

    with pytest.warns(dpcompile.PoissonSamplingWarning):
        noisy, expected_batch = update(1.5, "inductor")
        clean, _ = update(0.0, "eager")
    spread = (noisy - clean).double().std().item()
    expected = 1.5 * 0.5 / expected_batch
    assert abs(spread / expected - 1) < 0.05, (spread, expected)
