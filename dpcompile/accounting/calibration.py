"""Calibrate the noise multiplier σ for a target (ε, δ).

``get_noise_multiplier`` searches σ (in log space: bracketing, then a safeguarded
regula-falsi/bisection) until the accountant's ε is within ``epsilon_tolerance`` BELOW the
target. Every σ it returns has been evaluated by the accountant and gives ε ≤ target: the search
never overshoots, even where the accountant's ε is not exactly monotone in σ (PRV round-off).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from dpcompile.accounting._validation import (
    check_delta,
    check_positive,
    check_sample_rate,
    check_steps,
)
from dpcompile.accounting.base import Accountant, create_accountant
from dpcompile.accounting.gdp import gaussian_mu
from dpcompile.accounting.rdp import RDPOrderWarning

SIGMA_MIN = 1e-2
SIGMA_MAX = 1e4


def steps_for_epochs(epochs: float, sample_rate: float) -> int:
    """Number of Poisson steps for ``epochs`` passes: ``ceil(epochs / sample_rate)``.

    A quotient within 1e-9 (relative) of an integer is taken as that integer, so that
    e.g. 3 epochs at q = 0.1 are 30 steps, not 31 because 3 / 0.1 = 30.000000000000004.
    """
    epochs = check_positive(epochs, name="epochs")
    q = check_sample_rate(sample_rate)
    x = epochs / q
    r = round(x)
    if abs(x - r) <= 1e-9 * max(1.0, abs(r)):
        return max(1, int(r))
    return int(math.ceil(x))


def resolve_steps(steps: Any, epochs: Any, sample_rate: float) -> int:
    """Exactly one of ``steps`` / ``epochs`` -> a number of steps (≥ 1)."""
    if (steps is None) == (epochs is None):
        raise ValueError("give exactly one of steps and epochs")
    if steps is not None:
        n = check_steps(steps)
        if n < 1:
            raise ValueError(f"steps must be >= 1 for calibration, got {n}")
        return n
    return steps_for_epochs(epochs, sample_rate)


def _make_accountant(accountant: str | type[Accountant], kwargs: dict[str, Any]) -> Accountant:
    if isinstance(accountant, str):
        return create_accountant(accountant, **kwargs)
    if isinstance(accountant, type) and issubclass(accountant, Accountant):
        return accountant(**kwargs)
    raise ValueError(f"accountant must be a registered name or an Accountant subclass, "
                     f"got {accountant!r}")


def get_noise_multiplier(
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int | None = None,
    epochs: float | None = None,
    accountant: str | type[Accountant] = "prv",
    epsilon_tolerance: float = 0.01,
    **accountant_kwargs: Any,
) -> float:
    """σ such that ``target_epsilon - epsilon_tolerance ≤ ε(σ) ≤ target_epsilon``.

    ε(σ) ≤ target always holds for the returned σ. The lower side holds unless ε is flat in σ
    (then the search stops once σ is known to 1e-4, relative, or to 2% next to a σ the
    accountant cannot certify at all) or the target needs less noise than σ = 1e-2 (then 1e-2
    is returned).

    Args:
        target_epsilon, target_delta: the privacy target (ε > 0, 0 < δ < 1).
        sample_rate: Poisson sample rate q in (0, 1].
        steps / epochs: exactly one; ``steps = steps_for_epochs(epochs, sample_rate)``.
        accountant: registered accountant name (default ``"prv"``) or class.
        epsilon_tolerance: how far below the target the achieved ε may be.
        accountant_kwargs: passed to the accountant (e.g. ``eps_error`` for PRV).

    Raises:
        ValueError: bad arguments, or the target is unreachable (ε stays above the target even
            at σ = 1e4, e.g. below the accountant's resolution).
    """
    eps_t = check_positive(target_epsilon, name="target_epsilon")
    delta = check_delta(target_delta, name="target_delta")
    q = check_sample_rate(sample_rate)
    tol = check_positive(epsilon_tolerance, name="epsilon_tolerance")
    n = resolve_steps(steps, epochs, q)
    _make_accountant(accountant, accountant_kwargs)  # validate name and kwargs up front

    evaluated: dict[float, float] = {}

    def eps_of(sigma: float) -> float:
        if sigma not in evaluated:
            acc = _make_accountant(accountant, accountant_kwargs)
            acc.step(sigma, q, n)
            try:
                with warnings.catch_warnings():
                    # about the order grid at intermediate σ: not the user's concern
                    warnings.simplefilter("ignore", RDPOrderWarning)
                    value = float(acc.epsilon(delta))
            except ValueError:
                value = math.inf  # the accountant cannot certify at this σ: treat as too large
            evaluated[sigma] = value
        return evaluated[sigma]

    # Initial guess from the μ-GDP central limit approximation.
    mu = gaussian_mu(eps_t, delta)
    if q == 1.0:
        guess = math.sqrt(n) / mu
    else:
        guess = 1.0 / math.sqrt(math.log1p(mu * mu / (q * q * n)))
    guess = min(max(guess, SIGMA_MIN), SIGMA_MAX)

    # Bracket: lo has ε > target, hi has ε ≤ target.
    lo: float | None = None
    hi: float | None = None
    sigma = guess
    if eps_of(sigma) <= eps_t:
        hi = sigma
        while lo is None:
            if eps_of(hi) >= eps_t - tol:
                return hi
            cand = max(hi / 1.5, SIGMA_MIN)
            if eps_of(cand) > eps_t:
                lo = cand
            elif cand == SIGMA_MIN:
                return cand  # even almost no noise meets the target
            else:
                hi = cand
    else:
        lo = sigma
        while hi is None:
            cand = min(lo * 1.5, SIGMA_MAX)
            if eps_of(cand) <= eps_t:
                hi = cand
            elif cand == SIGMA_MAX:
                raise ValueError(
                    f"target epsilon {eps_t:g} at delta {delta:g} is unreachable with the "
                    f"{accountant if isinstance(accountant, str) else accountant.__name__!s} "
                    f"accountant: even noise_multiplier={SIGMA_MAX:g} gives epsilon "
                    f"{eps_of(cand):.4g} ({n} steps at sample rate {q:g})"
                )
            else:
                lo = cand

    # Safeguarded regula falsi (Illinois) on log ε against log σ (nearly linear: ε is roughly a
    # power of σ). Stops when ε is within the tolerance below the target, or when σ is pinned
    # down to 1e-4 (relative): the latter only matters where ε(σ) is flat (e.g. a tiny sample
    # rate: ε ≈ 0 for every σ).
    assert lo is not None and hi is not None
    log_t = math.log(eps_t)

    def resid(eps: float) -> float:
        return math.log(eps) - log_t if eps > 0 else -50.0

    u_lo, u_hi = math.log(lo), math.log(hi)
    e_hi = eps_of(hi)
    w_lo, w_hi = resid(eps_of(lo)), resid(e_hi)  # Illinois-weighted residuals
    side = 0
    for _ in range(100):
        # Where the accountant could not certify σ_lo at all, 2% is close enough.
        if e_hi >= eps_t - tol or (u_hi - u_lo) < (1e-4 if math.isfinite(w_lo) else 0.02):
            break
        width = u_hi - u_lo
        u = 0.5 * (u_lo + u_hi)
        if math.isfinite(w_lo) and w_lo != w_hi:
            secant = u_hi - w_hi * width / (w_hi - w_lo)
            if u_lo + 0.02 * width < secant < u_hi - 0.02 * width:
                u = secant
        eps = eps_of(math.exp(u))
        if eps > eps_t:
            u_lo, w_lo = u, resid(eps)
            if side == -1:
                w_hi /= 2.0
            side = -1
        else:
            u_hi, e_hi, w_hi = u, eps, resid(eps)
            if side == 1:
                w_lo /= 2.0
            side = 1
    result = math.exp(u_hi)
    if not eps_of(result) <= eps_t:  # by construction; never return an overshooting σ
        raise RuntimeError("calibration lost its bracket")  # pragma: no cover
    return result

