"""Adaptive clipping (Andrew et al. 2021): the bound tracks a quantile; its noise is accounted."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.privacy import AdaptiveClipping
from tests.reference import per_sample_grads


def test_budget_split_between_gradient_and_count():
    adaptive = AdaptiveClipping(count_noise_std=5.0)
    sigma = 1.2
    grad_sigma = adaptive.gradient_noise_multiplier(sigma)
    # (σ_Δ⁻² + (2σ_b)⁻²)^(-1/2) = σ
    assert (grad_sigma**-2 + (2 * 5.0) ** -2) ** -0.5 == pytest.approx(sigma)
    with pytest.raises(ValueError, match="count_noise_std"):
        AdaptiveClipping(count_noise_std=0.4).gradient_noise_multiplier(1.0)


def test_bound_converges_to_target_quantile():
    torch.manual_seed(0)
    n = 400
    x = torch.randn(n, 5) * torch.linspace(0.2, 3.0, n)[:, None]  # spread-out gradient norms
    y = torch.randint(0, 2, (n,))
    model = torch.nn.Linear(5, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=100)
    private, opt, dl = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=0.0), loader, noise_multiplier=0.5,
        max_grad_norm=10.0, clipping="adaptive", backend="eager",
        adaptive_clipping={"target_unclipped_quantile": 0.7, "clipbound_learning_rate": 0.3},
        noise_generator=torch.Generator().manual_seed(0),
    )
    assert private.privacy.noise_std == pytest.approx(
        private.privacy.adaptive.gradient_noise_multiplier(0.5) * 10.0
    )
    for _ in range(40):
        for bx, by in dl:
            opt.zero_grad()
            F.cross_entropy(private(bx), by).backward()
            opt.step()
    bound = private.privacy.max_grad_norm
    norms = torch.stack([
        torch.sqrt(sum(g.pow(2).sum() for g in gs.values()))
        for gs in per_sample_grads(model, lambda o, t: F.cross_entropy(o, t, reduction="none"), (x,), (y,))
    ])
    unclipped = (norms <= bound).double().mean().item()
    assert abs(unclipped - 0.7) < 0.1, (bound, unclipped)
    assert math.isfinite(private.privacy.epsilon(1e-5))
