"""Argument checks shared by the accountants, the calibration and the command line.

Every check raises :class:`ValueError` whose message names the offending argument, so that a
bad value is reported where it entered rather than as a NaN several layers further down.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or isinstance(value, (str, bytes)):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if math.isnan(result):
        raise ValueError(f"{name} must not be NaN")
    return result


def check_noise_multiplier(value: Any, *, allow_zero: bool = True,
                           name: str = "noise_multiplier") -> float:
    """σ: finite, ≥ 0 (or > 0 when ``allow_zero`` is false). σ = 0 means no privacy (ε = ∞)."""
    sigma = _as_float(name, value)
    if not math.isfinite(sigma):
        raise ValueError(f"{name} must be finite, got {sigma!r}")
    if sigma < 0 or (sigma == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {bound}, got {sigma!r}")
    return sigma


def check_sample_rate(value: Any, *, name: str = "sample_rate") -> float:
    """q: the Poisson inclusion probability, in (0, 1]."""
    q = _as_float(name, value)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {q!r}")
    return q


def check_delta(value: Any, *, name: str = "delta") -> float:
    """δ in the open interval (0, 1)."""
    delta = _as_float(name, value)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"{name} must be in (0, 1), got {delta!r}")
    return delta


def check_positive(value: Any, *, name: str, allow_inf: bool = False) -> float:
    """A finite (optionally infinite) number > 0."""
    x = _as_float(name, value)
    if not x > 0 or (math.isinf(x) and not allow_inf):
        raise ValueError(f"{name} must be a finite number > 0, got {x!r}")
    return x


def check_steps(value: Any, *, name: str = "steps") -> int:
    """A non-negative integer (integral floats such as ``3.0`` are accepted)."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    if isinstance(value, numbers.Integral):
        steps = int(value)
    else:
        x = _as_float(name, value)
        if not math.isfinite(x) or not x.is_integer():
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        steps = int(x)
    if steps < 0:
        raise ValueError(f"{name} must be >= 0, got {steps}")
    return steps
