"""Rényi-DP accounting of the Poisson-subsampled Gaussian mechanism.

One step with noise multiplier σ and sample rate q has, at order α > 1, the RDP

    ρ(α) = log(A_α) / (α - 1),   A_α = E_{x~N(0,σ²)}[(1 + v(x))^α],
    v(x) = q·(exp((2x - 1)/(2σ²)) - 1),

(Mironov, Talwar & Zhang 2019; the order P=mixture, Q=N(0,σ²) is the dominating one for
add/remove adjacency). Because E[v] = 0, A_α - 1 = E[g(v)] with
g(v) = (1+v)^α - 1 - αv ≥ 0 (convexity): every quantity summed below is non-negative, so there
is no cancellation and no negative intermediate result, and log A_α = log1p(A_α - 1) keeps full
relative precision even when A_α - 1 is tiny (small q, large σ).

* Integer α: A_α - 1 = Σ_{k=2..α} C(α,k) q^k (1-q)^(α-k) (exp(k(k-1)/(2σ²)) - 1), a finite sum of
  positive terms evaluated in log space.
* Fractional α: E[g(v)] by the trapezoidal rule on a uniform grid. The integrand is analytic in
  the strip |Im x| < πσ² and decays like a Gaussian, so the rule converges geometrically; with the
  step min(σ, σ²)/4 its error is far below double precision (checked against 50-digit quadrature
  in the tests).

Conversion to (ε, δ) (Balle et al. 2020, Thm. 21; Canonne, Kamath & Steinke 2020, Prop. 12):

    ε = min_α  R(α) + log((α-1)/α) - (log δ + log α)/(α - 1),

clamped at 0, and ε = 0 whenever δ ≥ sqrt(1 - exp(-R(α))) for some α (total variation is at
most sqrt(1 - exp(-KL)) and KL ≤ R(α)).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

import numpy as np
from scipy.special import gammaln, logsumexp

from dpcompile.accounting._validation import check_delta, check_noise_multiplier, check_sample_rate
from dpcompile.accounting.base import Accountant, AccountingWarning, register_accountant

#: The default order grid: 1.1, 1.2, ..., 10.9, then 11, ..., 63, then 128, 256, 512, 1024.
#: The part up to 63 is the grid Opacus uses; the large orders only matter for very small ε.
DEFAULT_ORDERS: tuple[float, ...] = tuple(
    [round(1 + x / 10.0, 10) for x in range(1, 100)]
    + [float(a) for a in range(11, 64)]
    + [128.0, 256.0, 512.0, 1024.0]
)

_DEFAULT_SORTED = np.unique(np.asarray(DEFAULT_ORDERS, dtype=float))
_MAX_INTEGER_ORDER_SUM = 1 << 16  # integer orders above this use the quadrature instead
_TAYLOR_V = 0.05  # |v| below which g(v) is evaluated by its Taylor series
_TAYLOR_TERMS = 18
_TAIL_SIGMAS = 13.0  # the Gaussian bumps are integrated over ±13σ (mass outside < 1e-38)


class RDPOrderWarning(AccountingWarning):
    """The optimal RDP order is at the edge of the order grid: extend the grid for a tighter ε."""


# ---------------------------------------------------------------------------- RDP of one step
@lru_cache(maxsize=512)
def _log_binomials(n: int) -> np.ndarray:
    """log C(n, k) for k = 0..n: exact integers up to n = 256, log-gamma above (abs. error
    ~1e-13, irrelevant at the large orders where it is used)."""
    if n <= 256:
        return np.array([math.log(math.comb(n, k)) for k in range(n + 1)])
    k = np.arange(n + 1, dtype=float)
    return gammaln(n + 1.0) - gammaln(k + 1.0) - gammaln(n - k + 1.0)


def _log_expm1(y: np.ndarray) -> np.ndarray:
    """log(exp(y) - 1) for y > 0 without overflow."""
    y = np.asarray(y, dtype=float)
    small = np.minimum(y, 30.0)
    return np.where(y > 30.0, y + np.log1p(-np.exp(-np.maximum(y, 30.0))), np.log(np.expm1(small)))


def _log_a_minus_one_integer(q: float, sigma: float, alpha: int) -> float:
    """log(A_α - 1) for integer α ≥ 2 and 0 < q < 1 (finite positive sum)."""
    k = np.arange(2, alpha + 1, dtype=float)
    terms = (
        _log_binomials(alpha)[2:]
        + k * math.log(q)
        + (alpha - k) * math.log1p(-q)
        + _log_expm1(k * (k - 1) / (2.0 * sigma * sigma))
    )
    return float(logsumexp(terms))


def _quadrature_grid(sigma: float, q: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and trapezoid weights covering the bumps of the integrand (at 0, 1 and α, ±13σ).

    The integrand is bounded by Gaussians of width σ centred at 0, 1 and α, so outside these
    windows it is below e^-84 of its bumps. Its only singularities are the branch points
    z0 ± iπσ²(2m+1) with z0 = σ² log((1-q)/q) + 1/2, so a window that contains z0 needs the step
    σ²/4; the others only need to resolve the Gaussians (step σ/4).
    """
    half = _TAIL_SIGMAS * sigma
    z0 = sigma * sigma * (math.log1p(-q) - math.log(q)) + 0.5
    windows: list[list[float]] = []
    for c in sorted((0.0, 1.0, alpha)):
        lo, hi = c - half, c + half
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], hi)
        else:
            windows.append([lo, hi])
    nodes, weights = [], []
    for lo, hi in windows:
        h = (min(sigma, sigma * sigma) if lo - sigma <= z0 <= hi + sigma else sigma) / 4.0
        n = int(math.ceil((hi - lo) / h))
        nodes.append(lo + h * np.arange(n + 1))
        weights.append(np.full(n + 1, h))  # endpoint values are negligible: plain sum
    return np.concatenate(nodes), np.concatenate(weights)


def _log_g(alpha: float, ell: np.ndarray, v: np.ndarray, log_v: np.ndarray) -> np.ndarray:
    """log g(v) = log((1+v)^α - 1 - αv) with ℓ = log(1+v) (all arrays of the same shape)."""
    out = np.empty_like(ell)
    small = np.abs(v) <= _TAYLOR_V
    if np.any(small):
        vs = v[small]
        # Σ_{j≥2} C(α, j) v^j, Horner from the top; the j=2 term dominates and is positive.
        coef = [1.0]
        for j in range(1, _TAYLOR_TERMS + 1):
            coef.append(coef[-1] * (alpha - j + 1) / j)
        acc = np.zeros_like(vs)
        for j in range(_TAYLOR_TERMS, 1, -1):
            acc = acc * vs + coef[j]
        with np.errstate(divide="ignore"):  # v = 0 exactly at x = 1/2: g = 0, log g = -inf
            out[small] = np.log(acc) + 2.0 * np.log(np.abs(vs))
    neg = (~small) & (v < 0)
    if np.any(neg):
        out[neg] = np.log(np.expm1(alpha * ell[neg]) - alpha * v[neg])
    pos = (~small) & (v > 0)
    if np.any(pos):
        a_ell = alpha * ell[pos]
        # g = (1+v)^α · (1 - (1+v)^-α - αv(1+v)^-α); both subtracted parts are < 1 here.
        rest = np.exp(-a_ell) + alpha * np.exp(log_v[pos] - a_ell)
        out[pos] = a_ell + np.log1p(-rest)
    return out


def _log_a_minus_one_quadrature(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """log(A_α - 1) for any orders α > 1 and 0 < q < 1 (trapezoidal rule, see module doc)."""
    log_q, log_1mq = math.log(q), math.log1p(-q)
    out = np.empty(len(alphas))
    for i, alpha in enumerate(alphas):
        x, w = _quadrature_grid(sigma, q, float(alpha))
        s = (2.0 * x - 1.0) / (2.0 * sigma * sigma)
        ell = np.logaddexp(log_1mq, log_q + s)  # log(1 + v)
        with np.errstate(over="ignore"):
            v = np.expm1(ell)
        # log v for v > 0: log q + log(exp(s) - 1).
        log_v = np.where(s > 0, log_q + _log_expm1(np.maximum(s, 1e-300)), -np.inf)
        log_phi = -0.5 * (x / sigma) ** 2 - math.log(sigma * math.sqrt(2.0 * math.pi))
        out[i] = logsumexp(log_phi + _log_g(float(alpha), ell, v, log_v) + np.log(w))
    return out


def compute_rdp(noise_multiplier: float, sample_rate: float,
                orders: Sequence[float] | np.ndarray = DEFAULT_ORDERS) -> np.ndarray:
    """RDP ρ(α) of ONE step of the Poisson-subsampled Gaussian mechanism, for every order.

    ``orders`` must all be > 1. σ = 0 gives ``inf`` everywhere.
    """
    sigma = check_noise_multiplier(noise_multiplier)
    q = check_sample_rate(sample_rate)
    alphas = _check_orders(orders)
    if sigma == 0.0:
        return np.full(len(alphas), np.inf)
    if q == 1.0:
        return alphas / (2.0 * sigma * sigma)
    log_am1 = np.empty(len(alphas))
    is_int = (alphas == np.round(alphas)) & (alphas <= _MAX_INTEGER_ORDER_SUM)
    for i in np.flatnonzero(is_int):
        log_am1[i] = _log_a_minus_one_integer(q, sigma, int(alphas[i]))
    frac = np.flatnonzero(~is_int)
    if len(frac):
        log_am1[frac] = _log_a_minus_one_quadrature(q, sigma, alphas[frac])
    # log A = log(1 + (A - 1)) = logaddexp(0, log(A - 1)); never negative.
    return np.logaddexp(0.0, log_am1) / (alphas - 1.0)


def _check_orders(orders: Iterable[float] | np.ndarray, name: str = "orders") -> np.ndarray:
    try:
        arr = np.asarray(list(orders) if not isinstance(orders, np.ndarray) else orders,
                         dtype=float).ravel()
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a sequence of numbers > 1") from None
    if arr.size == 0:
        raise ValueError(f"{name} must not be empty")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite (no NaN or inf)")
    if np.any(arr <= 1.0):
        raise ValueError(f"{name} must all be > 1, got {arr[arr <= 1.0][:3].tolist()}")
    return arr


# ---------------------------------------------------------------------------- RDP -> (ε, δ)
def rdp_to_epsilon(orders: Sequence[float] | np.ndarray, rdp: Sequence[float] | np.ndarray,
                   delta: float) -> tuple[float, float, bool]:
    """Convert total RDP values to ε at ``delta``.

    Returns ``(epsilon, optimal_order, at_edge)``; ``at_edge`` is true when the minimum sits at
    the first or last order of the (sorted) grid. ε is clamped to be ≥ 0.
    """
    delta = check_delta(delta)
    alphas = _check_orders(orders)
    r = np.asarray(rdp, dtype=float).ravel()
    if r.shape != alphas.shape:
        raise ValueError(f"rdp must have one value per order ({alphas.size}), got {r.size}")
    if np.any(np.isnan(r)) or np.any(r < 0):
        raise ValueError("rdp values must be >= 0 and not NaN")
    order_idx = np.argsort(alphas, kind="stable")
    alphas, r = alphas[order_idx], r[order_idx]
    with np.errstate(over="ignore", invalid="ignore"):
        eps = r + np.log1p(-1.0 / alphas) - (math.log(delta) + np.log(alphas)) / (alphas - 1.0)
    eps = np.where(np.isnan(eps), np.inf, eps)
    i = int(np.argmin(eps))
    if not np.isfinite(eps[i]):
        return math.inf, math.nan, False
    at_edge = alphas.size > 1 and (i == 0 or i == alphas.size - 1)
    epsilon = max(0.0, float(eps[i]))
    # Total variation ≤ sqrt(1 - exp(-KL)) ≤ sqrt(1 - exp(-R(α))): then δ alone suffices, ε = 0.
    tv_bound = np.sqrt(-np.expm1(-r))
    if np.any(tv_bound <= delta):
        return 0.0, float(alphas[int(np.argmin(r))]), False
    return epsilon, float(alphas[i]), bool(at_edge)


# ---------------------------------------------------------------------------- accountant
@register_accountant("rdp")
class RDPAccountant(Accountant):
    """Rényi-DP accountant (an upper bound on ε; typically a little looser than PRV).

    Args:
        orders: the RDP order grid (all > 1). Default :data:`DEFAULT_ORDERS`.

    ``epsilon`` is cheap: per-(σ, q) RDP vectors are cached and the total is kept up to date, so
    calling it every step costs a few microseconds plus one pass over the order grid.
    """

    _CACHE_SIZE = 4096

    def __init__(self, orders: Sequence[float] | None = None) -> None:
        super().__init__()
        self._orders = np.unique(_check_orders(DEFAULT_ORDERS if orders is None else orders))
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._rdp_cache: OrderedDict[tuple[float, float], np.ndarray] = OrderedDict()
        self._closed_total = np.zeros(len(self._orders))  # RDP of all segments but the last
        self._closed_count = 0
        self._result_cache: dict[float, tuple[float, float, bool]] = {}
        self._result_version = -1

    @property
    def orders(self) -> list[float]:
        """The order grid (sorted)."""
        return self._orders.tolist()

    def _get_settings(self) -> dict[str, Any]:
        # None stands for DEFAULT_ORDERS (keeps checkpoints and graph metadata small).
        if np.array_equal(self._orders, _DEFAULT_SORTED):
            return {"orders": None}
        return {"orders": [float(a) for a in self._orders]}

    def __repr__(self) -> str:
        return (f"RDPAccountant({len(self._orders)} orders in [{self._orders[0]:g}, "
                f"{self._orders[-1]:g}]) with {self.steps} steps")

    def _set_settings(self, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - {"orders"}
        if unknown:
            raise ValueError(f"state_dict settings: unknown keys {sorted(unknown)} for 'rdp'")
        orders = settings.get("orders")
        new = np.unique(_check_orders(DEFAULT_ORDERS if orders is None else orders,
                                      name="state_dict settings orders"))
        if not np.array_equal(new, self._orders):
            self._orders = new
            self._reset_caches()

    def _on_history_change(self, replaced: bool) -> None:
        # Closed segments never change again: fold them into the running total once.
        hist = self._history
        if replaced:
            self._closed_total = np.zeros(len(self._orders))
            self._closed_count = 0
        while self._closed_count < len(hist) - 1:
            s, q, n = hist[self._closed_count]
            self._closed_total = self._closed_total + n * self._step_rdp(s, q)
            self._closed_count += 1

    def _step_rdp(self, sigma: float, q: float) -> np.ndarray:
        key = (sigma, q)
        cached = self._rdp_cache.get(key)
        if cached is None:
            cached = compute_rdp(sigma, q, self._orders)
            self._rdp_cache[key] = cached
            if len(self._rdp_cache) > self._CACHE_SIZE:
                self._rdp_cache.popitem(last=False)
        else:
            self._rdp_cache.move_to_end(key)
        return cached

    def total_rdp(self) -> np.ndarray:
        """R(α) of the whole history, one value per order of :attr:`orders`."""
        if not self._history:
            return np.zeros(len(self._orders))
        s, q, n = self._history[-1]
        return self._closed_total + n * self._step_rdp(s, q)

    def _privacy_spent(self, delta: float) -> tuple[float, float, bool]:
        if self._result_version != self._version:
            self._result_cache = {}
            self._result_version = self._version
        result = self._result_cache.get(delta)
        if result is None:
            with np.errstate(invalid="ignore"):
                result = rdp_to_epsilon(self._orders, self.total_rdp(), delta)
            if len(self._result_cache) > 64:
                self._result_cache.clear()
            self._result_cache[delta] = result
            if result[2]:
                warnings.warn(
                    f"the optimal RDP order {result[1]:g} is at the edge of the order grid "
                    f"[{self._orders[0]:g}, {self._orders[-1]:g}]; pass a wider orders= grid "
                    "for a tighter epsilon",
                    RDPOrderWarning,
                    stacklevel=4,
                )
        return result

    def _compute_epsilon(self, delta: float) -> float:
        return self._privacy_spent(delta)[0]

    def get_privacy_spent(self, delta: float) -> tuple[float, float]:
        """``(epsilon, optimal_order)``; the order is NaN when there is nothing to optimise
        (no steps, or σ = 0 so that ε = inf)."""
        delta = check_delta(delta)
        if not self._history:
            return 0.0, math.nan
        if any(seg[0] == 0.0 for seg in self._history):
            return math.inf, math.nan
        eps, order, _ = self._privacy_spent(delta)
        return eps, order

    def optimal_order(self, delta: float) -> float:
        """The RDP order at which the conversion to (ε, δ) is tightest."""
        return self.get_privacy_spent(delta)[1]
