"""scipy functions the accountants need only to compute ε, imported on their first call.

scipy's optimize, integrate, fft and signal packages hold ~50 MB of resident memory; every
training process creates an accountant and records steps, and one that never asks for ε should
not carry them. ``scipy.special`` (small, and what RDP needs per step) is imported directly.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def _on_first_call(module: str, name: str) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


brentq = _on_first_call("scipy.optimize", "brentq")
quad = _on_first_call("scipy.integrate", "quad")
lfilter = _on_first_call("scipy.signal", "lfilter")
next_fast_len = _on_first_call("scipy.fft", "next_fast_len")
rfft = _on_first_call("scipy.fft", "rfft")
irfft = _on_first_call("scipy.fft", "irfft")
