"""Poisson sampling, measured through dp_compile's loader: batch sizes ~ Binomial(N, q), empty
batches at rate (1−q)^N, and empty batches still release noise of the claimed scale.

Every test is an exact test at level α = 1e-3 with fixed seeds (deterministic in CI; over random
seeds each would fail with probability ≤ α).
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from tests.audit.stats import binomial_goodness_of_fit, clopper_pearson_interval, variance_interval

D = torch.float64
ALPHA = 1e-3
N, BATCH = 50, 2  # q = 0.04, E[batch] = 2, P(empty) = 0.96^50 = 0.13


def private_run(secure=False, sigma=1.3, bound=0.7):
    torch.manual_seed(0)
    model = nn.Linear(20, 5).to(D)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(N, 20, generator=g, dtype=D), torch.randn(N, 5, generator=g, dtype=D))
    loader = DataLoader(data, batch_size=BATCH, generator=None if secure else torch.Generator().manual_seed(3))
    private, opt, dl = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=1.0), loader, noise_multiplier=sigma,
        max_grad_norm=bound, backend="eager", accountant="rdp", secure_mode=secure,
        noise_generator=None if secure else torch.Generator().manual_seed(4),
    )
    return model, private, opt, dl


@pytest.mark.parametrize("secure", [False, True])
def test_batch_sizes_are_binomial_and_empty_batches_have_the_right_rate(secure):
    _, private, _, dl = private_run(secure)
    q = private.privacy.sample_rate
    sizes = []
    for _ in range(120):  # 120 epochs of 25 logical batches
        sizes += [len(x) for x, _ in dl]
    assert len(sizes) == 3000
    p_value = binomial_goodness_of_fit(sizes, N, q)
    assert p_value >= ALPHA, p_value
    empty = sum(s == 0 for s in sizes)
    low, high = clopper_pearson_interval(empty, len(sizes), ALPHA)
    assert low <= (1 - q) ** N <= high, (empty / len(sizes), (1 - q) ** N)


def test_empty_batches_still_get_noise_of_the_claimed_scale():
    sigma, bound = 1.3, 0.7
    model, private, opt, dl = private_run(sigma=sigma, bound=bound)
    deltas = []
    steps = 0
    while len(deltas) < 40:
        for x, y in dl:
            before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
            opt.zero_grad()
            F.mse_loss(private(x), y).backward()
            opt.step()
            steps += 1
            if len(x) == 0:
                after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
                deltas.append(after - before)
    assert private.privacy.steps == steps  # empty steps are counted by the accountant
    noise = torch.cat(deltas)  # lr = 1: the update of an empty step is −noise / (qN)
    assert (noise != 0).all()
    expected = (sigma * bound / private.privacy.expected_batch_size) ** 2
    variance = float((noise**2).mean())  # known mean 0
    low, high = variance_interval(variance, noise.numel() + 1, ALPHA)
    assert low <= expected <= high, (variance, expected)
