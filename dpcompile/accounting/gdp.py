"""Gaussian-DP accounting (central-limit approximation for Poisson subsampling).

A Gaussian mechanism with noise multiplier σ and no subsampling (q = 1) is exactly
(1/σ)-GDP, and μ-GDP composes exactly: μ² adds up. For q < 1 the composition of T
Poisson-subsampled steps is only *approximately* μ-GDP with μ = q·sqrt(T·(exp(1/σ²) - 1))
(Bu, Dong, Long & Su 2020, central limit theorem). The approximation can UNDER-estimate ε
(it is not an upper bound), most visibly for small T, large q or small σ; use it to compare, not
to certify.

ε from μ and δ solves δ = Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2) (Dong, Roth & Su 2019), which is
evaluated in log space so that it stays accurate for large ε and tiny δ.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import log_ndtr

from dpcompile.accounting._scipy import brentq
from dpcompile.accounting._validation import check_delta, check_positive
from dpcompile.accounting.base import Accountant, AccountingWarning, register_accountant


class GDPApproximationWarning(AccountingWarning):
    """GDP accounting of a subsampled mechanism is a CLT approximation that can under-estimate ε."""


def _log_delta(epsilon: float, mu: float) -> float:
    """log δ(ε) of μ-GDP, for ε ≥ 0 and μ > 0."""
    a = -epsilon / mu + mu / 2.0
    b = -epsilon / mu - mu / 2.0
    log_pa = float(log_ndtr(a))
    diff = epsilon + float(log_ndtr(b)) - log_pa  # < 0
    if diff >= 0.0:  # only through rounding when δ underflows
        return -math.inf
    return log_pa + math.log(-math.expm1(diff))


def gaussian_delta(epsilon: float, mu: float) -> float:
    """Exact δ(ε) of a μ-GDP mechanism: Φ(-ε/μ + μ/2) - e^ε Φ(-ε/μ - μ/2)."""
    mu = check_positive(mu, name="mu", allow_inf=True)
    if math.isnan(epsilon) or epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon!r}")
    if math.isinf(mu):
        return 1.0
    if math.isinf(epsilon):
        return 0.0
    return math.exp(_log_delta(float(epsilon), mu))


def gaussian_epsilon(delta: float, mu: float) -> float:
    """Smallest ε ≥ 0 with δ(ε) ≤ ``delta`` for a μ-GDP mechanism."""
    delta = check_delta(delta)
    mu = check_positive(mu, name="mu", allow_inf=True)
    if math.isinf(mu):
        return math.inf
    log_target = math.log(delta)
    if _log_delta(0.0, mu) <= log_target:
        return 0.0
    hi = mu * mu / 2.0 + mu * math.sqrt(2.0 * -math.log(delta)) + 1.0
    while _log_delta(hi, mu) > log_target:
        hi *= 2.0
    return float(brentq(lambda e: _log_delta(e, mu) - log_target, 0.0, hi,
                        xtol=1e-14, rtol=4 * np.finfo(float).eps, maxiter=500))


def gaussian_mu(epsilon: float, delta: float) -> float:
    """The μ for which a μ-GDP mechanism is exactly (ε, δ)-DP (inverse of gaussian_delta)."""
    epsilon = check_positive(epsilon, name="epsilon")
    delta = check_delta(delta)
    log_target = math.log(delta)
    lo, hi = 1e-8, 1.0
    while _log_delta(epsilon, hi) < log_target:
        hi *= 2.0
        if hi > 1e8:
            return math.inf
    if _log_delta(epsilon, lo) >= log_target:
        return lo
    return float(brentq(lambda m: _log_delta(epsilon, m) - log_target, lo, hi,
                        xtol=1e-15, rtol=4 * np.finfo(float).eps, maxiter=500))


def gdp_mu(history: list[tuple[float, float, int]]) -> float:
    """μ of the composition: exact for q = 1 segments, CLT approximation for q < 1 ones."""
    mu2 = 0.0
    for sigma, q, steps in history:
        if sigma == 0.0:
            return math.inf
        if q == 1.0:
            mu2 += steps / (sigma * sigma)
        else:
            inv = 1.0 / (sigma * sigma)
            if inv > 700.0:  # exp overflows: μ is astronomically large
                return math.inf
            mu2 += steps * q * q * math.expm1(inv)
    return math.sqrt(mu2)


@register_accountant("gdp")
class GDPAccountant(Accountant):
    """Gaussian-DP accountant: exact when q = 1, a CLT approximation otherwise.

    The approximation can under-estimate ε; a :class:`GDPApproximationWarning` is issued once per
    instance, the first time ε is computed for a history with some q < 1.
    """

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def mu(self) -> float:
        """The μ of the (approximate) μ-GDP guarantee of the history."""
        return gdp_mu(self._history)

    def _compute_epsilon(self, delta: float) -> float:
        if not self._warned and any(q < 1.0 for _, q, _ in self._history):
            self._warned = True
            warnings.warn(
                "GDP accounting of Poisson-subsampled steps is a central-limit approximation "
                "that can under-estimate epsilon; use the 'prv' or 'rdp' accountant for a "
                "guarantee",
                GDPApproximationWarning,
                stacklevel=3,
            )
        mu = self.mu()
        if mu == 0.0:
            return 0.0
        return gaussian_epsilon(delta, mu)
