"""An empirical privacy audit of one DP-SGD step, through dp_compile's real code path.

The canary is a sample whose gradient is 1000·C along a coordinate (w₀ of a linear layer) that no
other sample's gradient touches. With sample rate 1 and a sum loss, the released update's
coordinate is −(C·[canary present] + σC·Z): in units of C, N(0, σ²) without the canary and
N(1, σ²) with it — exactly μ-GDP with μ = 1/σ, the claim this test checks. The clipping inside the
compiled backward (1000·C → C) and the optimizer's noise are both on the path.

The adversary guesses "canary present" when the statistic exceeds 1/2 (fixed in advance, so no
multiple testing). From TRIALS runs per arm, Clopper–Pearson upper bounds on its false-positive
and false-negative rates (α/2 each) give μ_lower = Φ⁻¹(1 − FPR⁺) − Φ⁻¹(FNR⁺) ≤ μ with probability
≥ 1 − α (tests/audit/stats.py). So:

- for the real implementation, μ_lower ≤ 1/σ; over random seeds this fails with probability
  at most α = 1e-3 (the expected μ_lower is about 0.88/σ at TRIALS = 5,000);
- an implementation that adds half the noise (true μ = 2/σ) gives μ_lower ≈ 1.85/σ > 1/σ, and
  one with 80% of the noise (true μ = 1.25/σ) gives μ_lower ≈ 1.13/σ: the audit detects both,
  as it detects an implementation that does not clip.

Seeds are fixed, so CI is deterministic. 2·TRIALS eager private steps per audit, about 0.5 ms
each on 2 CPU cores: the three audits take about 15 s.
"""

import math
import time

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.noise import NoiseSource
from tests.audit.stats import gdp_mu_lower_bound

D = torch.float64
SIGMA = 1.0
C = 1.0
TRIALS = 5_000
ALPHA = 1e-3
THRESHOLD = 0.5  # in units of C: halfway between the two arms' means
OTHERS = 7


def arm_data(with_canary: bool) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(OTHERS, 4, generator=g, dtype=D)
    x[:, 0] = 0.0  # no other sample's gradient touches w₀
    if with_canary:
        canary = torch.zeros(1, 4, dtype=D)
        canary[0, 0] = 1000 * C  # far above the clipping bound
        x = torch.cat([x, canary])
    return TensorDataset(x)


def statistics(with_canary: bool, seed: int, trials: int = TRIALS) -> torch.Tensor:
    """The adversary's statistic −Δw₀/C over ``trials`` independent private steps."""
    data = arm_data(with_canary)
    model = nn.Linear(4, 1, bias=False).to(D)
    private, opt, dl = dpcompile.dp_compile(
        model, torch.optim.SGD(model.parameters(), lr=1.0), DataLoader(data, batch_size=len(data)),
        noise_multiplier=SIGMA, max_grad_norm=C, loss_reduction="sum", backend="eager",
        accountant="rdp", noise_generator=torch.Generator().manual_seed(seed),
    )
    assert private.privacy.sample_rate == 1.0
    out = torch.empty(trials, dtype=D)
    for k in range(trials):
        (x,) = next(iter(dl))
        assert len(x) == len(data)
        before = model.weight[0, 0].item()
        opt.zero_grad()
        private(x).sum().backward()
        opt.step()
        out[k] = -(model.weight[0, 0].item() - before) / C
    return out


def audit(seed: int = 0) -> float:
    """μ_lower from one audit: TRIALS runs per arm."""
    without = statistics(False, seed=1000 + seed)
    with_canary = statistics(True, seed=2000 + seed)
    false_positives = int((without > THRESHOLD).sum())
    false_negatives = int((with_canary <= THRESHOLD).sum())
    return gdp_mu_lower_bound(false_positives, false_negatives, TRIALS, ALPHA)


def test_audit_passes_for_the_real_implementation():
    start = time.perf_counter()
    mu_lower = audit()
    elapsed = time.perf_counter() - start
    print(f"real: μ_lower={mu_lower:.3f} ≤ claimed μ=1/σ={1 / SIGMA:.3f} ({elapsed:.1f} s)")
    assert mu_lower <= 1 / SIGMA
    assert mu_lower > 0.8 / SIGMA  # and the audit is not vacuous: it nearly reaches the claim


@pytest.mark.parametrize("fraction", [0.5, 0.8])
def test_audit_detects_less_noise_than_claimed(monkeypatch, fraction):
    real = NoiseSource.normal_like

    def less(self, tensors):
        return [fraction * t for t in real(self, tensors)]

    monkeypatch.setattr(NoiseSource, "normal_like", less)
    mu_lower = audit()
    print(f"{fraction:.0%} of the noise: μ_lower={mu_lower:.3f} > claimed μ=1/σ={1 / SIGMA:.3f}")
    assert mu_lower > 1 / SIGMA


def test_audit_detects_missing_clipping(monkeypatch):
    from dpcompile.engine import Engine

    real = Engine.clip_bound_tensor
    monkeypatch.setattr(Engine, "clip_bound_tensor", lambda self, step, ref: real(self, step, ref) * 1e4)
    without = statistics(False, seed=1, trials=200)
    with_canary = statistics(True, seed=2, trials=200)
    mu_lower = gdp_mu_lower_bound(int((without > THRESHOLD).sum()), int((with_canary <= THRESHOLD).sum()),
                                  200, ALPHA)
    assert mu_lower > 1 / SIGMA


@pytest.mark.parametrize("alpha", [0.05, 0.3])
def test_the_bound_is_sound_by_simulation(alpha):
    """The statistics alone, on an exact Gaussian mechanism: P(μ_lower > μ) ≤ α, and the bound
    comes close to μ (the Clopper–Pearson bound is conservative, so the rate is below α)."""
    rng = np.random.default_rng(0)
    repetitions, trials, mu = 4000, 500, 1.0
    p_fp = norm.sf(THRESHOLD)
    p_fn = norm.cdf(THRESHOLD - mu)
    fp = rng.binomial(trials, p_fp, repetitions)
    fn = rng.binomial(trials, p_fn, repetitions)
    bounds = np.array([gdp_mu_lower_bound(int(a), int(b), trials, alpha) for a, b in zip(fp, fn)])
    flakes = float((bounds > mu).mean())
    assert flakes <= alpha + 3 * math.sqrt(alpha * (1 - alpha) / repetitions)
    assert np.median(bounds) > 0.5 * mu
