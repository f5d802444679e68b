"""A NaN/Inf in one sample's gradient never poisons a step: it is refused, or the sample dropped."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from tests.dpcompile.models import dataset_for, model_for
from tests.reference import clipped_reference

D = torch.float64
BAD = 3
N = 12


def ce(out, y):
    return F.cross_entropy(out, y, reduction="none")


def poisoned(name, how):
    """A dataset of N samples (x, y, w); sample BAD has an infinite input or a NaN loss weight."""
    x, y = dataset_for(name, n=N)
    if x.is_floating_point():
        x = x.to(D)
    w = torch.ones(N, dtype=D)
    if how == "input":
        x = x.clone()
        x[BAD] = float("inf")
    else:
        w[BAD] = float("nan")
    return x, y, w


def run(name, how, *, nonfinite, clipping="flat", physical=None, sigma=0.0, bound=0.5,
        backend="eager"):
    model = model_for(name).to(D)
    x, y, w = poisoned(name, how)
    loader = DataLoader(TensorDataset(x, y, w), batch_size=N)  # q = 1: every sample, every step
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if clipping == "per_layer":
        bound = [bound] * sum(p.requires_grad for p in model.parameters())
    private, opt, dl = dpcompile.dp_compile(
        model, opt, loader, noise_multiplier=sigma, max_grad_norm=bound, clipping=clipping,
        backend=backend, nonfinite=nonfinite, max_physical_batch_size=physical,
        noise_generator=torch.Generator().manual_seed(0),
    )
    error = None
    for bx, by, bw in dl:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loss = (ce(private(bx), by) * bw).mean()
        loss.backward()
        try:
            opt.step()
        except dpcompile.NonFiniteGradientError as e:
            error = e
        if dl.signal.end_of_logical_batch:
            break
    return model, private, opt, before, error


@pytest.mark.parametrize("how", ["input", "weight"])
@pytest.mark.parametrize("physical", [None, 5])
def test_default_policy_refuses_the_step_and_changes_nothing(how, physical):
    model, private, opt, before, error = run("mlp", how, nonfinite="error", physical=physical)
    assert error is not None
    assert f"positions {BAD}" in str(error) and "nonfinite='drop'" in str(error)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert private.privacy.steps == 0 and not opt.state
    assert not private._engine.accumulator


MODELS = ["mlp", "cnn", "seq", "embedding", "transformer", "lstm", "raw", "tied", "twice"]


@pytest.mark.parametrize(
    "name, how",
    [(m, "weight") for m in MODELS] + [(m, "input") for m in MODELS if m not in ("embedding", "lstm", "tied")],
)
def test_drop_policy_removes_exactly_that_sample(name, how):
    """Infinite inputs (non-finite activations) or a NaN loss weight (non-finite backward signal)."""
    x, y, w = poisoned(name, how)
    model, private, opt, before, error = run(name, how, nonfinite="drop")
    assert error is None and opt.dropped_samples == 1 and private.privacy.steps == 1
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    keep = torch.arange(N) != BAD
    _, clipped = clipped_reference(model, ce, (x[keep],), (y[keep],), 0.5)
    for n in after:
        assert torch.isfinite(after[n]).all()
        # Divided by the expected batch size q·N = N: dropping does not change the scaling.
        torch.testing.assert_close(after[n] - before[n], -clipped[n] / N, rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("clipping, physical", [("per_layer", None), ("flat", 4)])
@pytest.mark.parametrize("samples_per_conv_call", [16, 5])
def test_drop_policy_with_per_layer_clipping_and_physical_batches(monkeypatch, clipping, physical,
                                                                   samples_per_conv_call):
    from passes import grad_forms

    monkeypatch.setattr(grad_forms, "CONV_SAMPLES_PER_CALL_CPU", samples_per_conv_call)
    monkeypatch.setattr(grad_forms, "CONV_ONE_CALL_BYTES_CPU", 0)
    model, private, opt, before, error = run("cnn", "input", nonfinite="drop", clipping=clipping,
                                             physical=physical)
    assert error is None and opt.dropped_samples == 1
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    x, y, _ = poisoned("cnn", "input")
    keep = torch.arange(N) != BAD
    names = [n for n, _ in model.named_parameters()]
    bound = dict.fromkeys(names, 0.5) if clipping == "per_layer" else 0.5
    _, clipped = clipped_reference(model, ce, (x[keep],), (y[keep],), bound, clipping)
    for n in names:
        torch.testing.assert_close(after[n] - before[n], -clipped[n] / N, rtol=1e-6, atol=1e-12)


@pytest.mark.inductor
def test_drop_policy_under_inductor():
    model, private, opt, before, error = run("cnn", "input", nonfinite="drop", backend="inductor")
    assert error is None and opt.dropped_samples == 1
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n])
    x, y, _ = poisoned("cnn", "input")
    keep = torch.arange(N) != BAD
    _, clipped = clipped_reference(model, ce, (x[keep],), (y[keep],), 0.5)
    for n in after:
        torch.testing.assert_close(after[n] - before[n], -clipped[n] / N, rtol=1e-6, atol=1e-12)


def test_dropped_step_is_still_noised_and_accounted():
    model, private, opt, before, error = run("mlp", "input", nonfinite="drop", sigma=2.0)
    assert error is None and private.privacy.steps == 1
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all() and not torch.equal(p, before[n])


def test_unknown_policy():
    model = model_for("mlp").to(D)
    x, y = dataset_for("mlp")
    with pytest.raises(ValueError, match="nonfinite must be"):
        dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=1.0),
                             DataLoader(TensorDataset(x.to(D), y), batch_size=4),
                             noise_multiplier=1.0, nonfinite="ignore", backend="eager")
