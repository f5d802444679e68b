"""Real architectures: exact per-sample norms and clipped sums, and one private step each."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from tests.architectures.zoo import cases
from tests.passes.harness import assert_matches_reference
from tests.reference import clipped_reference

D = torch.float64
CASES = {name: rest for name, *rest in cases()}


@pytest.mark.parametrize("name", list(CASES))
def test_per_sample_norms_and_clipped_sums(name):
    build, x, y, loss = CASES[name]
    torch.manual_seed(0)
    model = build().to(D)
    assert_matches_reference(model, x.to(D) if x.is_floating_point() else x, y, loss)


@pytest.mark.parametrize("name", list(CASES))
def test_one_private_step_is_the_clipped_mean(name):
    build, x, y, loss = CASES[name]
    torch.manual_seed(0)
    model = build().to(D)
    x = x.to(D) if x.is_floating_point() else x
    data = TensorDataset(x.repeat(4, *([1] * (x.dim() - 1))), y.repeat(4, *([1] * (y.dim() - 1))))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    private, optimizer, loader = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=6),
        noise_multiplier=0.0, max_grad_norm=0.5, backend="eager",
    )
    bx, by = x, y  # a fixed batch through the user's loop
    optimizer.zero_grad()
    loss(private(bx), by).mean().backward()
    optimizer.step()
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(start[n])
    _, clipped = clipped_reference(model, loss, (bx,), (by,), 0.5)
    for n in clipped:
        torch.testing.assert_close(after[n] - start[n], -clipped[n] / private.privacy.expected_batch_size,
                                   rtol=1e-6, atol=1e-10, msg=lambda m, n=n: f"{name} {n}: {m}")
