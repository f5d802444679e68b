"""dp_compile through its public API: exact DP-SGD updates, noise, sampling, bounded compiles."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from tests.dpcompile.models import dataset_for, model_for
from tests.reference import clipped_reference

D = torch.float64
MODELS = ["mlp", "cnn", "pooled_cnn", "seq", "embedding", "transformer", "lstm", "raw", "tied", "twice", "frozen"]


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def one_step(name, *, clipping="flat", max_grad_norm=0.5, max_physical_batch_size=None, lr=1.0,
             backend="eager", batch_size=12, seed=0):
    """One private SGD step at σ=0; returns (params before, after, batch, privacy state, model)."""
    model = model_for(name).to(D)
    x, y = dataset_for(name)
    if x.is_floating_point():
        x = x.to(D)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    private, optimizer, loader = dpcompile.dp_compile(
        model, optimizer, loader, noise_multiplier=0.0, max_grad_norm=max_grad_norm,
        clipping=clipping, max_physical_batch_size=max_physical_batch_size, backend=backend,
        noise_generator=torch.Generator().manual_seed(seed),
    )
    torch.manual_seed(seed)
    seen_x, seen_y = [], []
    for bx, by in loader:
        optimizer.zero_grad()
        loss = F.cross_entropy(private(bx), by)
        loss.backward()
        optimizer.step()
        seen_x.append(bx)
        seen_y.append(by)
        if loader.signal.end_of_logical_batch and sum(len(b) for b in seen_y) > 0:
            break
        if loader.signal.end_of_logical_batch:
            seen_x, seen_y = [], []
            before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = (torch.cat(seen_x), torch.cat(seen_y))
    return before, {n: p.detach().clone() for n, p in model.named_parameters()}, batch, private.privacy, model


@pytest.mark.parametrize("name", MODELS)
def test_sigma_zero_update_is_mean_of_clipped_gradients(name):
    before, after, (x, y), privacy, model = one_step(name)
    # reference on the same parameters: restore them first
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    _, clipped = clipped_reference(model, ce, (x,), (y,), 0.5)
    expected_batch = privacy.expected_batch_size
    for n, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(after[n], before[n], rtol=0, atol=0)
            continue
        torch.testing.assert_close(after[n] - before[n], -clipped[n] / expected_batch, rtol=1e-6, atol=1e-10)


def test_per_layer_clipping_update():
    bounds = [0.3, 0.2, 0.4, 0.1]
    before, after, (x, y), privacy, model = one_step("mlp", max_grad_norm=bounds)
    assert privacy.clipping == "per_layer"
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    names = [n for n, _ in model.named_parameters()]
    _, clipped = clipped_reference(model, ce, (x,), (y,), dict(zip(names, bounds)), "per_layer")
    for n in names:
        torch.testing.assert_close(after[n] - before[n], -clipped[n] / privacy.expected_batch_size, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["mlp", "lstm"])
def test_physical_batches_equal_one_logical_batch(name):
    """Virtual steps: a logical batch split into physical batches gives the same update."""
    big = one_step(name, batch_size=20, seed=3)
    small = one_step(name, batch_size=20, seed=3, max_physical_batch_size=4)
    torch.testing.assert_close(big[2][1], small[2][1])  # same Poisson draw
    assert big[3].steps == small[3].steps == 1  # accounting counts logical steps
    for n in big[1]:
        torch.testing.assert_close(small[1][n], big[1][n], rtol=1e-9, atol=1e-12)


def test_noise_spread_matches_sigma_c_over_b():
    """Update minus its noiseless value has std σ·C/(qN); a 2x error in σ fails the bound."""
    torch.manual_seed(0)
    n, sigma, bound = 64, 1.7, 0.5
    model = torch.nn.Linear(100, 100).to(D)
    x, y = torch.randn(n, 100, dtype=D), torch.randn(n, 100, dtype=D)
    loader = DataLoader(TensorDataset(x, y), batch_size=16)

    def run(noise):
        m = torch.nn.Linear(100, 100).to(D)
        m.load_state_dict(model.state_dict())
        opt = torch.optim.SGD(m.parameters(), lr=1.0)
        priv, opt, dl = dpcompile.dp_compile(
            m, opt, loader, noise_multiplier=noise, max_grad_norm=bound, backend="eager",
            noise_generator=torch.Generator().manual_seed(1),
        )
        dl.batch_sampler.generator = torch.Generator().manual_seed(5)
        bx, by = next(iter(dl))
        opt.zero_grad()
        F.mse_loss(priv(bx), by).backward()
        opt.step()
        return torch.cat([p.detach().reshape(-1) for p in m.parameters()]), priv.privacy

    noisy, privacy = run(sigma)
    clean, _ = run(0.0)
    spread = (noisy - clean).std().item()
    expected = sigma * bound / privacy.expected_batch_size
    assert abs(spread / expected - 1) < 0.05, (spread, expected)


def test_poisson_batch_sizes_are_binomial():
    n, q, draws = 200, 0.05, 3000
    sampler = dpcompile.PoissonBatchSampler(n, q, steps=draws, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes.mean().item() - mean) < 4 * math.sqrt(var / draws)
    assert abs(sizes.var().item() / var - 1) < 0.1
    empty_rate = (sizes == 0).double().mean().item()
    p_empty = (1 - q) ** n
    assert abs(empty_rate - p_empty) < 4 * math.sqrt(p_empty * (1 - p_empty) / draws) + 1e-3


def test_empty_batches_still_step_with_noise():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(10, 3), torch.randint(0, 2, (10,))), batch_size=1)
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                            noise_multiplier=1.0, backend="eager")
    dl.batch_sampler.sample_rate = 1e-9  # every batch empty
    before = model.weight.detach().clone()
    for bx, by in dl:
        assert len(bx) == 0 and bx.shape[1:] == (3,)
        opt.zero_grad()
        F.cross_entropy(private(bx), by).backward()
        opt.step()
    assert private.privacy.steps == len(dl)
    assert not torch.equal(model.weight, before)  # noise moved it


def test_compiled_graph_count_stays_bounded_over_an_epoch():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU(), torch.nn.Linear(4, 3))
    x, y = torch.randn(2000, 6), torch.randint(0, 3, (2000,))
    loader = DataLoader(TensorDataset(x, y), batch_size=64)
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                            noise_multiplier=1.0, backend="eager")
    sizes = set()
    for bx, by in dl:
        sizes.add(len(bx))
        opt.zero_grad()
        F.cross_entropy(private(bx), by).backward()
        opt.step()
    assert len(sizes) > 10  # Poisson sizes vary...
    assert private.compiled_graph_count <= 5  # ...the compiled graphs do not


@pytest.mark.inductor
@pytest.mark.parametrize("name", ["cnn", "pooled_cnn"])
def test_inductor_backend_matches_eager(name):
    a = one_step(name, backend="eager")
    b = one_step(name, backend="inductor")
    for n in a[1]:
        torch.testing.assert_close(b[1][n], a[1][n], rtol=1e-6, atol=1e-9)


def test_target_epsilon_calibrates_and_is_respected():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    loader = DataLoader(TensorDataset(torch.randn(100, 3), torch.randint(0, 2, (100,))), batch_size=10)
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                            target_epsilon=2.0, target_delta=1e-5, epochs=2,
                                            accountant="rdp", backend="eager")
    assert private.privacy.noise_multiplier > 0
    for _ in range(2):
        for bx, by in dl:
            opt.zero_grad()
            F.cross_entropy(private(bx), by).backward()
            opt.step()
    eps = private.privacy.epsilon(1e-5)
    assert eps <= 2.0
    assert eps > 1.8  # calibrated, not wildly conservative


def test_loss_reduction_sum_is_not_divided():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).to(D)
    data = TensorDataset(torch.randn(20, 3, dtype=D), torch.randint(0, 2, (20,)))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0),
                                            DataLoader(data, batch_size=10), noise_multiplier=0.0,
                                            loss_reduction="sum", max_grad_norm=0.3, backend="eager")
    bx, by = next(iter(dl))
    opt.zero_grad()
    F.cross_entropy(private(bx), by, reduction="sum").backward()
    opt.step()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p_new = p.detach().clone()
            p.copy_(start[n])
            start[n] = (start[n], p_new)
    _, clipped = clipped_reference(model, ce, (bx,), (by,), 0.3)
    for n, (old, new) in start.items():
        torch.testing.assert_close(new - old, -clipped[n], rtol=1e-6, atol=1e-10)


def test_training_in_eval_mode_is_still_private():
    """A model trained in eval mode (no dropout) still gets clipped gradients, never raw ones."""
    torch.manual_seed(0)
    model = model_for("mlp").to(D)
    x, y = dataset_for("mlp")
    loader = DataLoader(TensorDataset(x.to(D), y), batch_size=10)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0), loader,
                                            noise_multiplier=0.0, max_grad_norm=0.1, backend="eager")
    private.eval()
    bx, by = next(iter(dl))
    opt.zero_grad()
    F.cross_entropy(private(bx), by).backward()
    opt.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    _, clipped = clipped_reference(model, ce, (bx,), (by,), 0.1)
    for n in start:
        torch.testing.assert_close(after[n] - start[n], -clipped[n] / private.privacy.expected_batch_size,
                                   rtol=1e-6, atol=1e-10)


def test_a_torch_compiled_model_is_unwrapped():
    torch.manual_seed(0)
    model = model_for("mlp")
    compiled = torch.compile(model)
    loader = DataLoader(TensorDataset(*dataset_for("mlp")), batch_size=10)
    private, opt, dl = dpcompile.dp_compile(compiled, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                            noise_multiplier=1.0, backend="eager")
    assert private.module is model
    bx, by = next(iter(dl))
    F.cross_entropy(private(bx), by).backward()
    opt.step()
    assert private.privacy.steps == 1


def test_a_second_backward_through_one_step_is_refused():
    """retain_graph=True and a second backward would count the batch twice (and the compiled
    backward may have reused its saved activations): refused with a message saying what to do."""
    model = model_for("cnn").to(D)
    x, y = dataset_for("cnn")
    loader = DataLoader(TensorDataset(x.to(D), y), batch_size=8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    private, optimizer, loader = dpcompile.dp_compile(model, optimizer, loader, noise_multiplier=1.0,
                                                      max_grad_norm=1.0, backend="eager")
    bx, by = next(iter(loader))
    loss = F.cross_entropy(private(bx), by)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*forward again"):
        loss.backward()
