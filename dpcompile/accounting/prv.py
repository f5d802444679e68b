"""Privacy-loss-random-variable (PRV) accounting (Gopi, Lee & Wutschitz 2021).

The privacy loss of one step, Y = log(P(X)/Q(X)) with X ~ P = (1-q)N(0,σ²) + qN(1,σ²) and
Q = N(0,σ²) (the dominating pair for add/remove adjacency), has an explicit CDF. The loss of
the composition is the sum of independent copies, and

    δ(ε) = E[(1 - exp(ε - ΣY))₊]

is a functional of that sum only. We discretise every Y on a common lattice of step h, compose
with the FFT and read ε off the composed distribution. The result is a certified upper bound:

* W = clamp(Y, t_lo, t_hi) is rounded to the nearest lattice point and shifted by a constant so
  that its mean equals E[W] (computed by quadrature). The rounding errors D are independent,
  mean zero and lie in an interval of length h, so by Hoeffding
  P[ΣY > ΣỸ + e] ≤ P[some Y_i > t_hi] + exp(-2e²/(k h²)). Since (1 - e^(ε-y))₊ is increasing
  in y and at most 1, δ_Y(ε + e) ≤ δ_Ỹ(ε) + η: the true ε at δ is at most ε_Ỹ(δ - η) + e.
* The circular convolution is exact up to aliasing. Exact Chernoff bounds from the log-MGF of
  the discretised sum place the window so that at most δe/8 of its mass lies above it (that
  mass is the only one that can be lost); mass below the window only adds (conservative).
* The composition is done on an exponentially tilted copy (weights e^{λt}, λ the Chernoff
  saddle point for δ), so that the FFT round-off is relative to the mass near the answer rather
  than to the bulk: this is what makes small δ (1e-10 and far below) work. The remaining
  round-off is estimated from the output and must fit in the δ budget, otherwise another
  window/tilt is tried and, failing all, a ValueError is raised instead of a wrong ε.

Budget of ``delta_error`` δe: clamping each step's loss at its δe/(4k) upper quantile (δe/4),
Hoeffding (δe/8), mass above the window (δe/8), round-off (≤ 5δe/16); for the lower bound the
lower clamps (δe/16) and the mass wrapped around in either direction (δe/8, δe/16) instead.

With e = ``eps_error`` and η ≤ ``delta_error`` the reported upper bound is
``max(0, ε_Ỹ(δ - delta_error) + eps_error)``; :meth:`PRVAccountant.epsilon_bounds` also gives
the matching lower bound ``ε_Ỹ(δ + delta_error) - eps_error`` and the point estimate.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.special import log_ndtr, logsumexp, ndtr, ndtri

from dpcompile.accounting._scipy import brentq, irfft, lfilter, next_fast_len, quad, rfft
from dpcompile.accounting._validation import check_delta, check_positive, check_steps
from dpcompile.accounting.base import Accountant, register_accountant

_EPS = float(np.finfo(float).eps)
_TAIL_SIGMAS = 13.0
_TILTED_TAIL = 1e-20  # tilted mass allowed outside the composition window
class _SingleStep:
    """The privacy loss Y of one Poisson-subsampled Gaussian step (remove direction)."""

    def __init__(self, sigma: float, q: float) -> None:
        self.sigma = sigma
        self.q = q
        self.log_q = math.log(q)
        self.log_1mq = math.log1p(-q) if q < 1.0 else -math.inf

    # -- Y as a function of the Gaussian sample x, and back
    def loss_of_x(self, x: np.ndarray) -> np.ndarray:
        s = (2.0 * x - 1.0) / (2.0 * self.sigma ** 2)
        if self.q == 1.0:
            return s
        return np.logaddexp(self.log_1mq, self.log_q + s)

    def x_of_loss(self, t: np.ndarray) -> np.ndarray:
        """x with loss_of_x(x) = t (-inf below the support)."""
        t = np.asarray(t, dtype=float)
        if self.q == 1.0:
            return self.sigma ** 2 * t + 0.5
        u = t - self.log_1mq
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            uu = np.maximum(u, 1e-300)
            log_em1 = np.where(uu > 30.0, uu + np.log1p(-np.exp(-np.maximum(uu, 30.0))),
                               np.log(np.expm1(np.minimum(uu, 30.0))))
            x = self.sigma ** 2 * (self.log_1mq + log_em1 - self.log_q) + 0.5
        return np.where(u > 0, x, -np.inf)

    # -- distribution of X ~ P
    def cdf_x(self, x: np.ndarray) -> np.ndarray:
        s = self.sigma
        if self.q == 1.0:
            return ndtr((x - 1.0) / s)
        return (1.0 - self.q) * ndtr(x / s) + self.q * ndtr((x - 1.0) / s)

    def sf_x(self, x: np.ndarray) -> np.ndarray:
        s = self.sigma
        if self.q == 1.0:
            return ndtr((1.0 - x) / s)
        return (1.0 - self.q) * ndtr(-x / s) + self.q * ndtr((1.0 - x) / s)

    def log_sf_x(self, x: float) -> float:
        s = self.sigma
        if self.q == 1.0:
            return float(log_ndtr((1.0 - x) / s))
        return float(np.logaddexp(self.log_1mq + log_ndtr(-x / s), self.log_q + log_ndtr((1.0 - x) / s)))

    def log_cdf_x(self, x: float) -> float:
        s = self.sigma
        if self.q == 1.0:
            return float(log_ndtr((x - 1.0) / s))
        return float(np.logaddexp(self.log_1mq + log_ndtr(x / s), self.log_q + log_ndtr((x - 1.0) / s)))

    # -- quantiles of Y
    def upper_quantile(self, p: float) -> float:
        """t with P[Y > t] = p."""
        if self.q == 1.0:
            mu = 1.0 / self.sigma
            return mu * mu / 2.0 + mu * float(-ndtri(p))
        lp = math.log(p)
        lo, hi = -60.0 * self.sigma, 1.0 + 60.0 * self.sigma
        if self.log_sf_x(lo) <= lp:
            return float(self.loss_of_x(np.array(lo)))
        x = brentq(lambda x: self.log_sf_x(x) - lp, lo, hi, xtol=1e-12 * max(1.0, self.sigma))
        return float(self.loss_of_x(np.array(x)))

    def lower_quantile(self, p: float) -> float:
        """t with P[Y < t] = p (or the bottom of the support)."""
        if self.q == 1.0:
            mu = 1.0 / self.sigma
            return mu * mu / 2.0 - mu * float(-ndtri(p))
        lp = math.log(p)
        lo, hi = -60.0 * self.sigma - 1.0, 1.0 + 60.0 * self.sigma
        if self.log_cdf_x(lo) >= lp:
            return self.log_1mq
        x = brentq(lambda x: self.log_cdf_x(x) - lp, lo, hi, xtol=1e-12 * max(1.0, self.sigma))
        return float(self.loss_of_x(np.array(x)))

    # -- CDF and survival function of Y
    def cdf(self, t: np.ndarray) -> np.ndarray:
        return self.cdf_x(self.x_of_loss(t))

    def sf(self, t: np.ndarray) -> np.ndarray:
        return self.sf_x(self.x_of_loss(t))

    # -- mean of Y (the KL divergence), by the trapezoidal rule in x
    def mean(self) -> float:
        sigma, q = self.sigma, self.q
        if q == 1.0:
            return 0.5 / sigma ** 2
        # E_P[Y] = E_{N(0,σ²)}[(1+v) log(1+v) - v], a non-negative integrand (E[v] = 0).
        half = _TAIL_SIGMAS * sigma
        z0 = sigma * sigma * (self.log_1mq - self.log_q) + 0.5
        windows = [[-half, half], [1.0 - half, 1.0 + half]]
        if windows[1][0] <= windows[0][1]:
            windows = [[-half, 1.0 + half]]
        total = []
        for lo, hi in windows:
            h = (min(sigma, sigma * sigma) if lo - sigma <= z0 <= hi + sigma else sigma) / 4.0
            x = lo + h * np.arange(int(math.ceil((hi - lo) / h)) + 1)
            ell = self.loss_of_x(x)  # log(1 + v)
            with np.errstate(over="ignore"):
                v = np.expm1(ell)
            log_k = np.full_like(x, -np.inf)
            small = np.abs(v) <= 0.05
            vs = v[small]
            acc = np.zeros_like(vs)
            for j in range(24, 1, -1):  # Σ_{j≥2} (-1)^j v^j / (j(j-1))
                acc = acc * vs + (-1.0) ** j / (j * (j - 1))
            with np.errstate(divide="ignore"):
                log_k[small] = np.log(acc) + 2.0 * np.log(np.abs(vs))
            neg = (~small) & (v < 0)
            log_k[neg] = np.log((1.0 + v[neg]) * ell[neg] - v[neg])
            pos = (~small) & (v > 0)
            log_k[pos] = ell[pos] + np.log(ell[pos] + np.expm1(-ell[pos]))
            log_phi = -0.5 * (x / sigma) ** 2 - math.log(sigma * math.sqrt(2.0 * math.pi))
            total.append(logsumexp(log_phi + log_k) + math.log(h))
        return float(np.exp(logsumexp(total)))

    def upper_partial_mean(self, t: float) -> float:
        """E[(Y - t)₊] = ∫_t^∞ P[Y > u] du."""
        if self.q == 1.0:
            mu = 1.0 / self.sigma
            m, sd = mu * mu / 2.0, mu
            z = (m - t) / sd
            return float((m - t) * ndtr(z) + sd * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
        val, _ = quad(lambda u: float(self.sf(np.array(u))), t, np.inf, limit=200)
        return float(val)

    def lower_partial_mean(self, t: float) -> float:
        """E[(t - Y)₊] = ∫_{-∞}^t P[Y < u] du."""
        if self.q == 1.0:
            mu = 1.0 / self.sigma
            m, sd = mu * mu / 2.0, mu
            z = (t - m) / sd
            return float((t - m) * ndtr(z) + sd * math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi))
        lo = self.log_1mq
        if t <= lo:
            return 0.0
        val, _ = quad(lambda u: float(self.cdf(np.array(u))), lo, t, limit=200)
        return float(val)


@dataclass
class _Discrete:
    """One segment discretised: pmf on lattice indices i_lo..i_lo+len(pmf)-1, mean shift."""

    i_lo: int
    pmf: np.ndarray
    shift: float
    steps: int
    logp: np.ndarray = field(init=False, repr=False)
    lattice: np.ndarray = field(init=False, repr=False)  # the indices i, as floats

    def __post_init__(self) -> None:
        with np.errstate(divide="ignore"):
            self.logp = np.log(self.pmf)
        self.lattice = self.i_lo + np.arange(len(self.pmf), dtype=float)


def _discretise(step: _SingleStep, h: float, t_lo: float, t_hi: float, steps: int) -> _Discrete:
    """Round W = clamp(Y, t_lo', t_hi') to the lattice hZ and match its mean (see module doc)."""
    i_lo = int(math.floor(t_lo / h))
    i_hi = int(math.ceil(t_hi / h))
    if i_hi <= i_lo:
        i_hi = i_lo + 1
    idx = np.arange(i_lo, i_hi + 1)
    edges = (idx[1:] - 0.5) * h  # upper edge of bins i_lo..i_hi-1
    x = step.x_of_loss(edges)
    cdf = step.cdf_x(x)
    sf = step.sf_x(x)
    # Bin m covers [edge_{m-1}, edge_m); the end bins absorb the clamped tails.
    lower_f = np.concatenate([[0.0], cdf])
    upper_f = np.concatenate([cdf, [1.0]])
    lower_s = np.concatenate([[1.0], sf])
    upper_s = np.concatenate([sf, [0.0]])
    use_cdf = upper_f <= 0.5
    pmf = np.where(use_cdf, upper_f - lower_f, lower_s - upper_s)
    pmf = np.maximum(pmf, 0.0)
    t_bot, t_top = i_lo * h, i_hi * h
    mean_w = step.mean() - step.upper_partial_mean(t_top) + step.lower_partial_mean(t_bot)
    mean_d = h * float(np.sum(idx * pmf)) / float(np.sum(pmf))
    pmf = pmf / np.sum(pmf)
    shift = mean_w - mean_d
    if not abs(shift) <= 0.5 * h * (1.0 + 1e-6) + 1e-12:
        raise RuntimeError(
            f"PRV discretisation failed for sigma={step.sigma}, q={step.q}: mean shift "
            f"{shift:.3g} exceeds half the mesh {h / 2:.3g} (numerical error)"
        )
    return _Discrete(i_lo=i_lo, pmf=pmf, shift=shift, steps=steps)


@dataclass
class _Result:
    lower: float
    estimate: float
    upper: float


_LAMBDAS = np.geomspace(1e-3, 1e3, 31)  # tilts for the Chernoff bounds of the lattice sum


def _log_mgf(discs: list[_Discrete], h: float, lam: float) -> float:
    """K(λ) = log E[exp(λ·h·ΣI)] of the composed lattice sum (exact, in log space)."""
    total = 0.0
    for d in discs:
        total += d.steps * float(logsumexp(d.logp + (lam * h) * d.lattice))
    return total


def prv_epsilon(segments: list[tuple[float, float, int]], delta: float, eps_error: float,
                delta_error: float, max_grid_points: int = 1 << 24) -> _Result:
    """(lower, estimate, upper) ε of the composition of ``segments`` (σ > 0), see module doc."""
    # Composition is commutative: merge equal (σ, q) segments wherever they occur.
    grouped: dict[tuple[float, float], int] = {}
    for s, q, n in segments:
        grouped[(s, q)] = grouped.get((s, q), 0) + n
    k = sum(grouped.values())
    e, de = eps_error, delta_error
    h = e * math.sqrt(2.0 / (k * math.log(8.0 / de)))
    steps = {key: _SingleStep(*key) for key in grouped}

    # Supports: clamp each step's loss at its δe/(4k) upper and δe/(16k) lower quantiles.
    supports = {key: (st.lower_quantile(de / (16.0 * k)), st.upper_quantile(de / (4.0 * k)))
                for key, st in steps.items()}
    widest = max(hi - lo for lo, hi in supports.values()) / h
    if widest > max_grid_points / 4:  # a single step this wide: ε is huge, the grid would be too
        raise _too_big(delta, e, 4 * widest, max_grid_points)
    discs = [_discretise(steps[key], h, *supports[key], n) for key, n in grouped.items()]
    shift = sum(d.shift * d.steps for d in discs)  # ΣỸ = h·ΣI + shift

    # Exact Chernoff bounds of the discrete sum from its log-MGF K on a grid of tilts.
    k_pos = np.array([_log_mgf(discs, h, lam) for lam in _LAMBDAS])
    k_neg = np.array([_log_mgf(discs, h, -lam) for lam in _LAMBDAS])
    log_a = math.log(8.0 / de)
    top_plain = shift + float(np.min((k_pos + log_a) / _LAMBDAS))  # P[ΣỸ ≥ top] ≤ δe/8
    bottom_plain = shift - float(np.min((k_neg + log_a) / _LAMBDAS))  # P[ΣỸ ≤ bottom] ≤ δe/8
    bottom_markov = -math.log(8.0 / de) - e - 2.0 * h  # ΣY ≥ this w.p. 1 - δe/8 (E[e^-Y] = 1)

    # Windows to try, best first. Tilted ones centre the composition on the answer (round-off
    # relative to δ: what makes small δ work); the untilted one is the classic PRV window.
    log_d = math.log(1.0 / delta)
    i_s = int(np.argmin((k_pos + log_d) / _LAMBDAS))
    lam_s, best = float(_LAMBDAS[i_s]), float((k_pos[i_s] + log_d) / _LAMBDAS[i_s])
    for r in (0.8, 0.89, 1.12, 1.26):  # refine between the grid points (ratio 1.58)
        cand = float(_LAMBDAS[i_s]) * r
        val = (_log_mgf(discs, h, cand) + log_d) / cand
        if val < best:
            lam_s, best = cand, val
    log_t = math.log(1.0 / _TILTED_TAIL)
    # (λ, bottom, top, the log-MGF table (tilts, K) for λ > 0)
    windows: list[tuple[float, float, float, tuple[np.ndarray, np.ndarray] | None]] = []
    for lam in (lam_s, lam_s / 4.0, lam_s / 16.0):
        # The tilted law's tails need K close to λ: the global grid is too coarse there.
        near = lam * np.array([0.25, 0.5, 0.65, 0.8, 0.9, 0.95, 1.05, 1.1, 1.2, 1.35, 1.5, 2.0])
        lams = np.concatenate([-_LAMBDAS, [0.0], _LAMBDAS, near])
        ks = np.concatenate([k_neg, [0.0], k_pos, [_log_mgf(discs, h, x) for x in near]])
        k0 = _log_mgf(discs, h, lam)
        up, down = lams > lam, lams < lam
        x_hi = shift + float(np.min((ks[up] - k0 + log_t) / (lams[up] - lam)))
        x_lo = shift + float(np.max((k0 - ks[down] - log_t) / (lam - lams[down])))
        top = max(top_plain, x_hi)
        # Mass below the window wraps to its top damped by exp(-λ·width): keep that below δe.
        bottom = max(min(bottom_plain, bottom_markov), min(x_lo, top - (log_a + 10.0) / lam))
        windows.append((lam, bottom, top, (lams, ks)))
    windows.append((0.0, bottom_plain, top_plain, None))
    if bottom_markov < bottom_plain:
        windows.append((0.0, bottom_markov, top_plain, None))
    need = min((w[2] - w[1]) / h for w in windows) + 4
    windows = [w for w in windows if (w[2] - w[1]) / h + 4 <= max_grid_points]
    if not windows:
        raise _too_big(delta, e, need, max_grid_points)

    targets = [delta - de, delta, delta + de]
    errors: list[str] = []
    for lam, bottom, top, mgf in windows:
        try:
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                # Far below the answer the tilt weights overflow; those bins are never used.
                raw, period = _compose_and_invert(discs, h, lam, bottom, top, shift, targets, de)
        except _WindowTooHigh as err:
            if bottom <= bottom_markov:
                # δ - delta_error is only reached below -log(8/delta_error): ε_Ỹ < -e, ε = 0.
                return _Result(lower=0.0, estimate=0.0, upper=0.0)
            errors.append(str(err))
            continue
        except _Retry as err:
            errors.append(str(err))
            continue
        lower = max(0.0, raw.lower - e)
        if mgf is not None and lower > 0.0:
            # With a tilt, mass above the window wraps around AMPLIFIED by e^{λ·period}. Only
            # the part landing above the lower crossing t_c matters (it only adds, so the upper
            # bound is safe); bound it by Chernoff: ≤ 2 exp(K(λ') - λ'(t_c - shift)
            # - (λ' - λ)·period) for λ' > λ. The lower bound needs that below δe/16.
            lams, ks = mgf
            up = lams > lam
            alias = float(np.min(ks[up] - lams[up] * (raw.lower - shift)
                                 - (lams[up] - lam) * period)) + math.log(2.0)
            if alias > math.log(de / 16.0):
                lower = 0.0  # not certified: only the trivial lower bound
        return _Result(lower=lower, estimate=max(0.0, raw.estimate), upper=max(0.0, raw.upper + e))
    raise ValueError(
        f"PRV accounting cannot certify epsilon for delta={delta:g} with eps_error={e:g}, "
        f"delta_error={de:g} ({errors[-1]}). Use a larger eps_error or delta_error, a larger "
        "max_grid_points, or the 'rdp' accountant"
    )


def _too_big(delta: float, e: float, need: float, max_grid_points: int) -> ValueError:
    return ValueError(
        f"PRV accounting cannot certify epsilon for delta={delta:g} with eps_error={e:g}: it "
        f"would need about {need:,.0f} grid points (max_grid_points={max_grid_points:,}). Use a "
        "larger eps_error, a larger max_grid_points, or the 'rdp' accountant"
    )


class _Retry(Exception):
    """This window/tilt does not work numerically; try the next one."""


class _WindowTooHigh(_Retry):
    """The answer lies below the window."""


def _compose_and_invert(discs: list[_Discrete], h: float, lam: float, bottom: float, top: float,
                        total_shift: float, targets: list[float],
                        de: float) -> tuple[_Result, float]:
    i_bottom = int(math.floor((bottom - total_shift) / h))
    i_top = int(math.ceil((top - total_shift) / h))
    needed = i_top - i_bottom + 1
    n = next_fast_len(max(needed, 16), real=True)
    if n % 2:
        n += 1

    # Tilt, fold onto Z_n and compose in Fourier space.
    log_m_total = 0.0
    spectrum = None
    for d in discs:
        logp = d.logp + (lam * h) * d.lattice
        log_m = float(logsumexp(logp))
        tilted = np.exp(logp - log_m)
        idx = d.i_lo + np.arange(len(d.pmf))
        folded = np.bincount(np.mod(idx, n), weights=tilted, minlength=n)
        spec = rfft(folded)
        spec[0] = 1.0  # the exact total mass: keeps the power from drifting
        spec = spec ** d.steps if d.steps > 1 else spec
        spectrum = spec if spectrum is None else spectrum * spec
        log_m_total += d.steps * log_m
    assert spectrum is not None
    circ = irfft(spectrum, n)
    # Representatives of the residues in the window [i_bottom, i_bottom + n).
    z = np.roll(circ, -(i_bottom % n))
    lattice = i_bottom + np.arange(n)
    t = lattice * h + total_shift

    # p*(I) = z_I · exp(K - λ h I). Scale by the weight at the tilted peak; exponents are
    # clipped (far below the peak, beneath the answer, the values do not matter).
    j_ref = int(np.argmax(z))
    log_ref = log_m_total - lam * h * (i_bottom + j_ref)
    w = np.exp(np.clip(-lam * h * (np.arange(n) - j_ref), -745.0, 700.0))
    p = z * w  # p*(I) · exp(-log_ref)
    # Reverse recursions (no overflow, no cancellation), for ε in [t_I, t_{I+1}]:
    #   D1(I) = Σ_{J≥I} p_J,  E(I) = Σ_{J≥I} p_J e^{t_I - t_J} = p_I + e^{-h} E(I+1),
    #   G(I) = δ(t_I) = D1(I) - E(I) = G(I+1) + (1 - e^{-h}) E(I+1),
    #   δ(ε) = D1(I+1) - e^{ε - t_{I+1}} E(I+1).
    rev = p[::-1]
    d1 = np.cumsum(rev)[::-1]
    e_rec = lfilter([1.0], [1.0, -math.exp(-h)], rev)[::-1]
    inc = np.empty(n)
    inc[:-1] = -math.expm1(-h) * e_rec[1:]
    inc[-1] = 0.0
    delta_at = np.cumsum(inc[::-1])[::-1]
    # Round-off: noise level of z from its negative entries (FFT noise is symmetric).
    zmax = float(np.max(z))
    noise = max(2.0 * float(-np.min(z)), 4.0 * _EPS * math.log2(n) * zmax, 0.0)
    noise_tail = noise * np.cumsum(w[::-1])[::-1]  # Σ_{J≥I} noise·weight_J

    def crossing(target: float) -> tuple[float, int]:
        """Largest ε with δ̂(ε) ≥ target (the conservative crossing) and its bin."""
        scaled = float(np.exp(math.log(target) - log_ref))
        above = np.flatnonzero(delta_at >= scaled)
        if above.size == 0:
            return -math.inf, -1
        i = int(above[-1])
        if i >= n - 2:
            raise _Retry("delta is not reached below the top of the window (round-off)")
        num = d1[i + 1] - scaled
        den = e_rec[i + 1]
        if den <= 0 or num <= 0:
            return float(t[i + 1]), i
        eps = t[i + 1] + math.log(num) - math.log(den)
        return float(min(max(eps, t[i]), t[i + 1])), i

    margin = 4  # the answer must not sit in the bottom bins (wrapped-around mass lands there)
    lo_t, mid_t, hi_t = targets
    eps_up, i_up = crossing(lo_t)
    if i_up <= margin:
        raise _WindowTooHigh(f"crossing for delta={lo_t:g} below the window")
    if lam > 0 and -lam * h * (i_up - j_ref) >= 700.0:  # weights clipped at/below the answer
        raise _Retry("the tilt is too strong for this window")
    with np.errstate(divide="ignore"):
        log_fp = float(np.log(noise_tail[i_up])) + log_ref  # log of the round-off bound on δ
    if not log_fp <= math.log(5.0 * de / 16.0):
        raise _Retry(f"floating-point noise ~{math.exp(min(log_fp, 700.0)):.2g} exceeds the "
                     "delta budget")
    eps_mid, i_mid = crossing(mid_t)
    if i_mid <= margin:
        eps_mid = -math.inf
    eps_low = -math.inf
    if hi_t < 1.0:
        eps_low, i_low = crossing(hi_t)
        if i_low <= margin:
            eps_low = -math.inf  # below the window: only the trivial lower bound is certain
    return _Result(lower=eps_low, estimate=eps_mid, upper=eps_up), n * h


@register_accountant("prv")
class PRVAccountant(Accountant):
    """PRV accountant: a certified upper bound on ε, tight to about ``eps_error``.

    Args:
        eps_error: ε slack of the bound (the upper bound exceeds the estimate by this much).
        delta_error: δ slack; default ``delta / 1000``. Must be smaller than δ.
        max_grid_points: refuse (ValueError) to allocate FFT grids larger than this.

    ``epsilon`` costs one FFT over ~ sqrt(steps)·log(1/δ)/eps_error points per call; results
    are cached per (history, δ).
    """

    _CACHE_SIZE = 32

    def __init__(self, eps_error: float = 0.01, delta_error: float | None = None,
                 max_grid_points: int = 1 << 24) -> None:
        super().__init__()
        self._set_settings({"eps_error": eps_error, "delta_error": delta_error,
                            "max_grid_points": max_grid_points})
        self._cache: OrderedDict[tuple[Any, ...], _Result] = OrderedDict()

    @property
    def eps_error(self) -> float:
        return self._eps_error

    @property
    def delta_error(self) -> float | None:
        return self._delta_error

    def _get_settings(self) -> dict[str, Any]:
        return {"eps_error": self._eps_error, "delta_error": self._delta_error,
                "max_grid_points": self._max_grid_points}

    def _set_settings(self, settings: Mapping[str, Any]) -> None:
        unknown = set(settings) - {"eps_error", "delta_error", "max_grid_points"}
        if unknown:
            raise ValueError(f"unknown PRV settings {sorted(unknown)}")
        eps_error = check_positive(settings.get("eps_error", 0.01), name="eps_error")
        de = settings.get("delta_error")
        delta_error = None if de is None else check_positive(de, name="delta_error")
        if delta_error is not None and delta_error >= 1.0:
            raise ValueError(f"delta_error must be < 1, got {delta_error!r}")
        mgp = check_steps(settings.get("max_grid_points", 1 << 24), name="max_grid_points")
        if mgp < 1024:
            raise ValueError(f"max_grid_points must be >= 1024, got {mgp}")
        self._eps_error, self._delta_error, self._max_grid_points = eps_error, delta_error, mgp
        if hasattr(self, "_cache"):
            self._cache.clear()

    def _delta_error_for(self, delta: float) -> float:
        de = self._delta_error if self._delta_error is not None else delta / 1000.0
        if not de < delta:
            raise ValueError(f"delta_error ({de!r}) must be smaller than delta ({delta!r})")
        return de

    def _result(self, delta: float) -> _Result:
        de = self._delta_error_for(delta)
        key = (tuple(self._history), delta, self._eps_error, de, self._max_grid_points)
        res = self._cache.get(key)
        if res is None:
            res = prv_epsilon(self._history, delta, self._eps_error, de, self._max_grid_points)
            self._cache[key] = res
            if len(self._cache) > self._CACHE_SIZE:
                self._cache.popitem(last=False)
        return res

    def _compute_epsilon(self, delta: float) -> float:
        return self._result(delta).upper

    def epsilon_bounds(self, delta: float) -> tuple[float, float, float]:
        """``(lower, estimate, upper)``: the true ε lies in [lower, upper]."""
        delta = check_delta(delta)
        if not self._history:
            return 0.0, 0.0, 0.0
        if any(seg[0] == 0.0 for seg in self._history):
            return math.inf, math.inf, math.inf
        r = self._result(delta)
        return r.lower, r.estimate, r.upper
