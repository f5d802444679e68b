"""RDP accountant: reference vectors, high-precision oracle, cross-checks, monotonicity."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpcompile.accounting import (
    DEFAULT_ORDERS,
    RDPAccountant,
    RDPOrderWarning,
    compute_rdp,
    gaussian_epsilon,
)
from dpcompile.accounting.rdp import rdp_to_epsilon

# DESIGN.md vectors: (sigma, q, steps, delta, epsilon, optimal order).
# Tolerance 1e-10 absolute. The first vector has its optimum at the fractional order 3.9 and
# was produced by Opacus 1.6, whose series for fractional orders stops once terms fall below
# e^-30: its RDP(3.9) is low by 1.1e-11 (relative), i.e. epsilon by 5e-11 after 2250 steps.
# A 50-digit mpmath evaluation agrees with our value (see test_rdp_matches_mpmath), which is
# 7.32911117148, so only the twelfth significant digit of the vector is Opacus' truncation.
RDP_VECTORS = [
    (1.5, 0.04, 2250, 1e-5, 7.32911117143, 3.9),
    (1.3, 0.0025, 6000, 1e-5, 0.7242234026, 19.0),
    (1.0, 0.001, 30000, 1e-7, 1.4154988495, 13.0),
]


@pytest.mark.parametrize("sigma,q,steps,delta,expected,order", RDP_VECTORS)
def test_design_vectors(sigma, q, steps, delta, expected, order):
    acc = RDPAccountant()
    acc.step(sigma, q, steps)
    eps, best = acc.get_privacy_spent(delta)
    assert eps == pytest.approx(expected, abs=1e-10)
    assert best == order
    assert acc.optimal_order(delta) == order
    assert acc.epsilon(delta) == eps


def test_default_grid_contains_opacus_grid():
    opacus_grid = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    assert set(np.round(opacus_grid, 10)) <= set(np.round(DEFAULT_ORDERS, 10))
    # The extra orders (11, 128..1024) do not change the vectors.
    for sigma, q, steps, delta, expected, _ in RDP_VECTORS:
        acc = RDPAccountant(orders=opacus_grid)
        acc.step(sigma, q, steps)
        assert acc.epsilon(delta) == pytest.approx(expected, abs=1e-10)


def _rdp_mpmath(q: float, sigma: float, alpha: float) -> float:
    """RDP by 25-digit quadrature of E_{N(0,σ²)}[(1+v)^α - 1 - αv] (independent of the code)."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 25
    q_, s_, a_ = mp.mpf(q), mp.mpf(sigma), mp.mpf(alpha)

    def f(x):
        v = q_ * mp.expm1((2 * x - 1) / (2 * s_ * s_))
        return mp.npdf(x, 0, s_) * ((1 + v) ** a_ - 1 - a_ * v)

    z0 = s_ ** 2 * mp.log((1 - q_) / q_) + mp.mpf(1) / 2
    pts = sorted({-40 * s_, -10 * s_, mp.mpf(0), mp.mpf(1) / 2, mp.mpf(1), z0, a_, a_ + 10 * s_,
                  a_ + 40 * s_})
    return float(mp.log1p(mp.quad(f, [-mp.inf, *pts, mp.inf])) / (a_ - 1))


@pytest.mark.parametrize("sigma,q,orders", [
    (1.5, 0.04, [1.1, 3.9, 13.0]),  # the first DESIGN.md vector
    (5.0, 1e-4, [1.5, 7.7, 40.0]),  # tiny A - 1: Opacus loses ~1e-5 relative at 1.1 here
    (0.2, 0.01, [2.5, 10.9]),  # step sigma^2/4 around z0
    (30.0, 0.5, [1.1, 6.3]),
    (0.7, 1e-6, [1.1, 4.5]),
    (0.05, 0.5, [1.3, 9.9]),  # tiny sigma: three separate windows
])
def test_rdp_matches_mpmath(sigma, q, orders):
    ours = compute_rdp(sigma, q, orders)
    ref = np.array([_rdp_mpmath(q, sigma, a) for a in orders])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=0)


def test_rdp_q1_is_gaussian():
    orders = np.array([1.5, 2.0, 10.0, 100.0])
    np.testing.assert_allclose(compute_rdp(0.8, 1.0, orders), orders / (2 * 0.8 ** 2), rtol=1e-15)


def test_rdp_against_opacus():
    rdp_mod = pytest.importorskip("opacus.accountants.analysis.rdp")
    orders = [2.0, 3.0, 8.0, 32.0, 63.0, 1.5, 3.9, 7.7]
    for sigma, q in [(1.1, 0.004), (0.8, 0.1), (2.0, 0.02), (4.0, 0.5)]:
        ref = np.array(rdp_mod.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=orders))
        np.testing.assert_allclose(compute_rdp(sigma, q, orders), ref, rtol=1e-7)


def test_rdp_against_dp_accounting_integer_orders():
    # dp-accounting 0.6 adds the negative terms of the fractional-order series as positive ones
    # (its fractional RDP is only an upper bound), so compare integer orders only.
    rdp_mod = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    orders = [2, 3, 5, 11, 32, 64, 256]
    for sigma, q in [(1.1, 0.004), (0.9, 0.2), (3.0, 0.001)]:
        ref = rdp_mod._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
        np.testing.assert_allclose(compute_rdp(sigma, q, orders), ref, rtol=1e-8)


def test_heterogeneous_history_against_opacus():
    opacus = pytest.importorskip("opacus.accountants")
    grid = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    history = [(1.0, 0.01, 300), (1.5, 0.02, 200), (0.9, 0.005, 1000)]
    ref = opacus.RDPAccountant()
    ref.history = list(history)
    ours = RDPAccountant(orders=grid)
    for s, q, n in history:
        ours.step(s, q, n)
    eps_ref, order_ref = ref.get_privacy_spent(delta=1e-6)
    eps, order = ours.get_privacy_spent(1e-6)
    assert eps == pytest.approx(eps_ref, rel=1e-8)
    assert order == order_ref


def test_repeated_steps_equal_one_segment():
    a, b = RDPAccountant(), RDPAccountant()
    for _ in range(500):
        a.step(1.2, 0.01)
    b.step(1.2, 0.01, 500)
    assert a.history == b.history == [(1.2, 0.01, 500)]
    assert a.epsilon(1e-5) == b.epsilon(1e-5)


def test_segments_add_up():
    a = RDPAccountant()
    a.step(1.0, 0.01, 100)
    a.step(2.0, 0.05, 50)
    a.step(1.0, 0.01, 10)
    expected = (110 * compute_rdp(1.0, 0.01) + 50 * compute_rdp(2.0, 0.05))
    np.testing.assert_allclose(a.total_rdp(), expected, rtol=1e-13)
    assert len(a.history) == 3


def test_epsilon_above_exact_q1_oracle():
    for sigma, steps, delta in [(1.0, 1, 1e-5), (2.0, 100, 1e-5), (0.7, 10, 1e-10), (5.0, 5000, 1e-3)]:
        acc = RDPAccountant()
        acc.step(sigma, 1.0, steps)
        exact = gaussian_epsilon(delta, math.sqrt(steps) / sigma)
        eps = acc.epsilon(delta)
        assert eps >= exact
        assert eps <= exact * 1.5 + 1.0  # and not absurdly loose


def test_edge_warning_and_custom_grid():
    acc = RDPAccountant(orders=[2.0, 3.0, 4.0])
    acc.step(1.0, 0.01, 100)
    with pytest.warns(RDPOrderWarning, match="edge"):
        _, order = acc.get_privacy_spent(1e-5)
    assert order == 4.0
    wide = RDPAccountant()
    wide.step(1.0, 0.01, 100)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RDPOrderWarning)
        eps_wide = wide.epsilon(1e-5)
    assert eps_wide < acc.epsilon(1e-5)
    big_sigma = RDPAccountant()
    big_sigma.step(500.0, 1.0, 1)  # optimum above the largest order, 1024
    with pytest.warns(RDPOrderWarning):
        big_sigma.epsilon(1e-5)


@pytest.mark.parametrize("orders", [[], [1.0, 2.0], [0.5], [2.0, float("nan")], "abc"])
def test_bad_orders(orders):
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant(orders=orders)


def test_zero_steps_and_zero_noise():
    acc = RDPAccountant()
    assert acc.epsilon(1e-5) == 0.0
    eps, order = acc.get_privacy_spent(1e-5)
    assert eps == 0.0 and math.isnan(order)
    acc.step(0.0, 0.01, 10)
    assert acc.epsilon(1e-5) == math.inf
    assert acc.get_privacy_spent(1e-5)[0] == math.inf


def test_conversion_never_negative():
    orders = np.array([2.0, 4.0, 8.0])
    eps, _, _ = rdp_to_epsilon(orders, np.zeros(3), 0.9)
    assert eps == 0.0
    eps, _, _ = rdp_to_epsilon(orders, np.array([1e-9, 2e-9, 4e-9]), 0.5)
    assert eps == 0.0
    with pytest.raises(ValueError, match="rdp"):
        rdp_to_epsilon(orders, np.array([-1.0, 0.0, 0.0]), 1e-5)


sigmas = st.floats(0.3, 20.0)
rates = st.floats(1e-5, 1.0)
deltas = st.floats(1e-12, 0.5)


@given(sigma=st.floats(0.05, 1e4), q=st.floats(1e-12, 1.0), alpha=st.floats(1.01, 300.0))
def test_rdp_finite_nonnegative(sigma, q, alpha):
    r = compute_rdp(sigma, q, [alpha, math.floor(alpha) + 1.0])
    assert np.all(np.isfinite(r)) and np.all(r >= 0)


@given(sigma=sigmas, q=rates, steps=st.integers(1, 100_000), delta=deltas,
       f=st.floats(1.01, 2.0))
def test_rdp_monotone(sigma, q, steps, delta, f):
    def eps(s=sigma, r=q, n=steps, d=delta):
        acc = RDPAccountant()
        acc.step(s, r, n)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RDPOrderWarning)
            return acc.epsilon(d)

    e0 = eps()
    tol = 1e-12 * max(1.0, e0)
    assert eps(s=sigma * f) <= e0 + tol
    assert eps(r=min(1.0, q * f)) >= e0 - tol
    assert eps(n=int(steps * f) + 1) >= e0 - tol
    assert eps(d=min(0.9, delta * f)) <= e0 + tol
