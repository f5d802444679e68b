"""A privacy budget: ``max_epsilon`` at the target δ, enforced before every noisy step.

``dp_compile(..., max_epsilon=ε_max)`` stores ε_max in the privacy state. Before a logical step
releases anything, the optimizer asks whether the ε *after* that step would stay within ε_max,
and refuses the step with :class:`PrivacyBudgetExceeded` if not: ``.grad`` is not written, the
wrapped optimizer does not run, the accountant does not record a step and the clipped sums of
the refused batch are discarded (nothing of that batch was released, so it costs nothing). The
data loader asks the same question before drawing a logical batch and stops cleanly instead.

ε of the accountants costs 10–100 ms (PRV), too much for every step. So the number of further
steps at the current (σ, q) that fit in the budget is found once by a search over copies of the
accountant (ε grows with the number of steps) and cached for the accountant's history; the step
that would use the last one is checked exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from dpcompile.accounting import accountant_from_state_dict

__all__ = [
    "PrivacyBudgetExceeded",
    "PrivacyBudgetWarning",
    "budget_allows_step",
    "epsilon_after",
    "remaining_steps",
]


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than ``max_epsilon``; nothing was updated."""

    def __init__(self, message: str, *, epsilon_after: float, max_epsilon: float, delta: float,
                 steps: int) -> None:
        super().__init__(message)
        self.epsilon_after = epsilon_after
        self.max_epsilon = max_epsilon
        self.delta = delta
        self.steps = steps


class PrivacyBudgetWarning(UserWarning):
    """The privacy budget is spent: the data loader stopped."""


def epsilon_after(privacy: Any, steps: int = 1, delta: float | None = None) -> float:
    """ε at ``delta`` (default: the target δ) after ``steps`` more steps at the current (σ, q)."""
    delta = privacy.target_delta if delta is None else delta
    return _epsilon_with(privacy, privacy.accountant.history, steps, delta)


def _epsilon_with(privacy: Any, history: list[tuple[float, float, int]], extra: int,
                  delta: float) -> float:
    state = privacy.accountant.state_dict()
    rows = [list(seg) for seg in history]
    if extra:
        rows.append([privacy.noise_multiplier, privacy.sample_rate, int(extra)])
    state["history"] = rows
    copy = accountant_from_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # calibration-edge and approximation warnings
        return float(copy.epsilon(delta))


def remaining_steps(privacy: Any) -> int | None:
    """How many more steps at the current (σ, q) keep ε ≤ ``max_epsilon``; None without a budget."""
    budget = getattr(privacy, "max_epsilon", None)
    if budget is None:
        return None
    sigma, q, delta = privacy.noise_multiplier, privacy.sample_rate, privacy.target_delta
    history = privacy.accountant.history
    done = 0
    base = history
    if history and history[-1][0] == sigma and history[-1][1] == q:
        base, done = history[:-1], history[-1][2]
    key = (tuple(base), sigma, q, budget, delta, repr(privacy.accountant.state_dict()["settings"]),
           privacy.accountant.name)
    cache = privacy.__dict__.get("_budget_cache")
    if cache is None or cache[0] != key:
        cache = (key, _max_steps(privacy, base, budget, delta))
        privacy.__dict__["_budget_cache"] = cache
    return max(0, cache[1] - done)


def budget_allows_step(privacy: Any) -> bool:
    """True if one more step keeps ε within the budget (always, without a budget)."""
    left = remaining_steps(privacy)
    if left is None:
        return True
    if left != 1:
        return left > 1
    # The last step the search allows: check it exactly (no monotonicity assumed).
    try:
        return epsilon_after(privacy, 1) <= privacy.max_epsilon
    except ValueError:  # the accountant cannot certify ε after that step
        return False


def budget_message(privacy: Any, consequence: str) -> str:
    try:
        after = f"{epsilon_after(privacy, 1):.4g}"
    except ValueError:
        after = "a value the accountant cannot certify"
    return (
        f"privacy budget reached: one more step would bring ε to {after} at δ="
        f"{privacy.target_delta:g}, above max_epsilon={privacy.max_epsilon:g} (ε so far "
        f"{privacy.epsilon():.4g} after {privacy.steps} steps); {consequence}"
    )


def _max_steps(privacy: Any, base: list[tuple[float, float, int]], budget: float,
               delta: float) -> int:
    """The largest m with ε(base + m steps at (σ, q)) ≤ budget, assuming ε grows with m.

    Galloping to a bracket, then regula falsi with the Illinois modification on log ε against
    log m (ε grows roughly like a power of m): typically 6–12 evaluations of ε.
    """
    if privacy.noise_multiplier == 0:
        return 0

    def log_excess(m: int) -> float:
        try:
            value = _epsilon_with(privacy, base, m, delta)
        except ValueError:  # the accountant cannot certify ε this far out: over budget
            return math.inf
        return math.log(value / budget) if value > 0 else -math.inf

    low, g_low = 1, log_excess(1)
    if g_low > 0:
        return 0
    slope = 0.5
    high, g_high = 0, math.inf
    while True:  # gallop: ε grows about like a power of m
        growth = math.exp(-g_low / slope) if math.isfinite(g_low) else 64.0
        probe = int(low * min(max(growth, 2.0), 64.0))
        if probe > 1 << 40:
            return probe
        g = log_excess(probe)
        if g > 0:
            high, g_high = probe, g
            break
        if math.isfinite(g) and math.isfinite(g_low) and g > g_low:
            slope = min(max((g - g_low) / math.log(probe / low), 0.2), 1.0)
        low, g_low = probe, g
    side = 0  # +1: the last probe moved `low`, -1: it moved `high`
    while high - low > 1:
        if math.isfinite(g_high) and math.isfinite(g_low):
            x_low, x_high = math.log(low), math.log(high)
            x = x_low - g_low * (x_high - x_low) / (g_high - g_low)
            probe = int(math.exp(x))
        else:
            probe = int(math.sqrt(low * high))
        probe = min(max(probe, low + 1), high - 1)
        g = log_excess(probe)
        if g <= 0:
            low, g_low = probe, g
            if side == 1:
                g_high /= 2  # Illinois: the far end stayed twice, pull it in
            side = 1
        else:
            high, g_high = probe, g
            if side == -1:
                g_low /= 2
            side = -1
    return low


def check_budget_argument(max_epsilon: float | None) -> float | None:
    if max_epsilon is None:
        return None
    value = float(max_epsilon)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"max_epsilon must be a finite number > 0, got {max_epsilon}")
    return value
