"""GDP accountant and the exact μ-GDP formulas (the q = 1 oracle)."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpcompile.accounting import (
    GDPAccountant,
    GDPApproximationWarning,
    PRVAccountant,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_mu,
)


def _delta_mp(eps: float, mu: float) -> float:
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 60
    e, m = mp.mpf(eps), mp.mpf(mu)
    return float(mp.ncdf(-e / m + m / 2) - mp.e ** e * mp.ncdf(-e / m - m / 2))


@pytest.mark.parametrize("eps,mu", [(0.0, 1.0), (1.0, 0.5), (3.0, 1.0), (50.0, 5.0),
                                    (294.17178625764456, 20.0), (1000.0, 10.0), (0.1, 30.0)])
def test_gaussian_delta_matches_mpmath(eps, mu):
    assert gaussian_delta(eps, mu) == pytest.approx(_delta_mp(eps, mu), rel=1e-11, abs=1e-300)


@pytest.mark.parametrize("delta,mu", [(1e-5, 1.0), (1e-10, 3.0), (1e-300, 10.0), (0.05, 0.2),
                                      (1e-6, 20.0)])
def test_gaussian_epsilon_inverts(delta, mu):
    eps = gaussian_epsilon(delta, mu)
    assert _delta_mp(eps, mu) == pytest.approx(delta, rel=1e-9)
    assert gaussian_mu(eps, delta) == pytest.approx(mu, rel=1e-9)


def test_gaussian_epsilon_zero_when_delta_large():
    assert gaussian_epsilon(0.5, 0.1) == 0.0  # δ(0) = 2Φ(μ/2) - 1 ≈ 0.04 < 0.5


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (2.0, 400, 1e-8), (0.9, 10, 1e-3)])
def test_exact_at_q1_and_silent(sigma, steps, delta):
    acc = GDPAccountant()
    acc.step(sigma, 1.0, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GDPApproximationWarning)
        eps = acc.epsilon(delta)
    assert acc.mu() == pytest.approx(math.sqrt(steps) / sigma, rel=1e-15)
    assert _delta_mp(eps, math.sqrt(steps) / sigma) == pytest.approx(delta, rel=1e-9)


def test_warns_once_per_instance():
    acc = GDPAccountant()
    acc.step(1.0, 0.01, 1000)
    with pytest.warns(GDPApproximationWarning, match="under-estimate"):
        acc.epsilon(1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", GDPApproximationWarning)
        acc.step(1.0, 0.01, 1)
        acc.epsilon(1e-6)
    other = GDPAccountant()
    other.step(1.0, 0.01, 1)
    with pytest.warns(GDPApproximationWarning):
        other.epsilon(1e-5)


def test_mu_matches_opacus():
    gdp = pytest.importorskip("opacus.accountants.analysis.gdp")
    acc = GDPAccountant()
    acc.step(1.1, 0.004, 15000)
    ref = gdp.compute_mu_poisson(steps=15000, noise_multiplier=1.1, sample_rate=0.004)
    assert acc.mu() == pytest.approx(ref, rel=1e-12)
    with pytest.warns(GDPApproximationWarning):
        eps = acc.epsilon(1e-5)
    assert eps == pytest.approx(gdp.eps_from_mu(mu=ref, delta=1e-5), rel=1e-6)


def test_clt_can_under_estimate():
    """Few steps at a large rate: the CLT ε is below what PRV certifies as a LOWER bound."""
    gdp, prv = GDPAccountant(), PRVAccountant()
    for acc in (gdp, prv):
        acc.step(0.8, 0.3, 10)
    with pytest.warns(GDPApproximationWarning):
        eps_gdp = gdp.epsilon(1e-5)
    lower, _, _ = prv.epsilon_bounds(1e-5)
    assert eps_gdp < lower


@given(mu=st.floats(0.01, 50.0), delta=st.floats(1e-15, 0.5), f=st.floats(1.01, 2.0))
def test_gaussian_epsilon_monotone(mu, delta, f):
    e = gaussian_epsilon(delta, mu)
    assert gaussian_epsilon(delta, mu * f) >= e
    assert gaussian_epsilon(min(0.9, delta * f), mu) <= e
    assert e >= 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="mu"):
        gaussian_delta(1.0, -1.0)
    with pytest.raises(ValueError, match="epsilon"):
        gaussian_delta(float("nan"), 1.0)
    with pytest.raises(ValueError, match="delta"):
        gaussian_epsilon(0.0, 1.0)
