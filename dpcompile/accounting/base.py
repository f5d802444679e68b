"""The accountant interface, its registry and its serialisation format.

An accountant records the history of a Poisson-subsampled Gaussian mechanism as segments
``(noise_multiplier, sample_rate, steps)`` (consecutive identical segments are merged) and turns
it into an (ε, δ) guarantee under add/remove-one adjacency.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeVar

from dpcompile.accounting._validation import (
    check_delta,
    check_noise_multiplier,
    check_sample_rate,
    check_steps,
)

STATE_FORMAT_VERSION = 1

Segment = tuple[float, float, int]


class AccountingWarning(UserWarning):
    """Base class of the warnings emitted by :mod:`dpcompile.accounting`."""


class Accountant(abc.ABC):
    """Abstract privacy accountant for the Poisson-subsampled Gaussian mechanism.

    Subclasses implement :meth:`_compute_epsilon` (history is non-empty and every σ > 0 there)
    and, when they have settings, :meth:`_get_settings` / :meth:`_set_settings`.
    """

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        self._history: list[Segment] = []
        self._version = 0  # bumped on every change of the history (cache key)

    # ------------------------------------------------------------------ history
    @property
    def history(self) -> list[Segment]:
        """Segments ``(noise_multiplier, sample_rate, steps)``, oldest first (a copy)."""
        return list(self._history)

    @property
    def steps(self) -> int:
        """Total number of steps recorded."""
        return sum(seg[2] for seg in self._history)

    def __len__(self) -> int:
        return self.steps

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Record ``steps`` steps with noise multiplier σ and Poisson sample rate q.

        σ = 0 is accepted (no noise: every ε is then ``math.inf``); σ < 0, q outside (0, 1],
        negative or non-integer ``steps`` and NaN raise :class:`ValueError`.
        """
        sigma = check_noise_multiplier(noise_multiplier)
        q = check_sample_rate(sample_rate)
        n = check_steps(steps)
        if n == 0:
            return
        self._append(sigma, q, n)
        self._version += 1
        self._on_history_change(replaced=False)

    def _append(self, sigma: float, q: float, n: int) -> None:
        if self._history and self._history[-1][0] == sigma and self._history[-1][1] == q:
            s, r, m = self._history[-1]
            self._history[-1] = (s, r, m + n)
        else:
            self._history.append((sigma, q, n))

    def _on_history_change(self, replaced: bool) -> None:  # noqa: B027 (optional hook)
        """Hook for subclasses that cache per history (``replaced``: by load_state_dict)."""

    # ------------------------------------------------------------------ epsilon
    def epsilon(self, delta: float) -> float:
        """ε spent so far at the given δ (0 for no steps, ``math.inf`` if some σ is 0)."""
        delta = check_delta(delta)
        if not self._history:
            return 0.0
        if any(seg[0] == 0.0 for seg in self._history):
            return math.inf
        return float(self._compute_epsilon(delta))

    def get_epsilon(self, delta: float) -> float:
        """Alias of :meth:`epsilon` (Opacus compatibility)."""
        return self.epsilon(delta)

    @abc.abstractmethod
    def _compute_epsilon(self, delta: float) -> float:
        """ε for a validated δ, a non-empty history and σ > 0 everywhere."""

    # ------------------------------------------------------------------ state
    def _get_settings(self) -> dict[str, Any]:
        return {}

    def _set_settings(self, settings: Mapping[str, Any]) -> None:
        """Validate all of ``settings``, then apply them (override together with _get_settings)."""
        if settings:
            raise ValueError(
                f"state_dict settings: accountant {self.name!r} takes no settings, "
                f"got {sorted(settings)}"
            )

    def state_dict(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: name, format version, settings and history."""
        return {
            "name": self.name,
            "version": STATE_FORMAT_VERSION,
            "settings": self._get_settings(),
            "history": [[float(s), float(q), int(n)] for s, q, n in self._history],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict` snapshot; raises ``ValueError`` if it is malformed.

        The snapshot's settings replace this accountant's settings. Nothing is changed when
        validation fails.
        """
        if not isinstance(state, Mapping):
            raise ValueError(f"state_dict must be a mapping, got {type(state).__name__}")
        missing = {"name", "version", "settings", "history"} - set(state)
        if missing:
            raise ValueError(f"state_dict is missing keys {sorted(missing)}")
        unknown = set(state) - {"name", "version", "settings", "history"}
        if unknown:
            raise ValueError(f"state_dict has unknown keys {sorted(unknown)}")
        if state["name"] != self.name:
            raise ValueError(
                f"state_dict name is {state['name']!r} but this accountant is {self.name!r}"
            )
        if state["version"] != STATE_FORMAT_VERSION:
            raise ValueError(
                f"state_dict version {state['version']!r} is not supported "
                f"(expected {STATE_FORMAT_VERSION})"
            )
        settings = state["settings"]
        if not isinstance(settings, Mapping):
            raise ValueError("state_dict settings must be a mapping")
        history = _parse_history(state["history"])
        self._set_settings(settings)  # validates everything before assigning anything
        self._history = []
        for s, q, n in history:
            self._append(s, q, n)
        self._version += 1
        self._on_history_change(replaced=True)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self._get_settings().items())
        return f"{type(self).__name__}({settings}) with {self.steps} steps"


def _parse_history(raw: Any) -> list[Segment]:
    if not isinstance(raw, (list, tuple)):
        raise ValueError("state_dict history must be a list of [noise_multiplier, sample_rate, steps]")
    out: list[Segment] = []
    for i, seg in enumerate(raw):
        if not isinstance(seg, (list, tuple)) or len(seg) != 3:
            raise ValueError(
                f"state_dict history[{i}] must be [noise_multiplier, sample_rate, steps], "
                f"got {seg!r}"
            )
        s = check_noise_multiplier(seg[0], name=f"history[{i}] noise_multiplier")
        q = check_sample_rate(seg[1], name=f"history[{i}] sample_rate")
        n = check_steps(seg[2], name=f"history[{i}] steps")
        if n:
            out.append((s, q, n))
    return out


# ---------------------------------------------------------------------- registry
_REGISTRY: dict[str, type[Accountant]] = {}

A = TypeVar("A", bound=type[Accountant])


def register_accountant(name: str) -> Callable[[A], A]:
    """Class decorator: register an :class:`Accountant` subclass under ``name``.

    Sets ``cls.name``. Registering a different class under a taken name raises ``ValueError``.
    """
    if not isinstance(name, str) or not name or not name.isidentifier():
        raise ValueError(f"accountant name must be a non-empty identifier, got {name!r}")

    def decorator(cls: A) -> A:
        if not (isinstance(cls, type) and issubclass(cls, Accountant)):
            raise TypeError(f"@register_accountant({name!r}) needs an Accountant subclass")
        existing = _REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise ValueError(f"an accountant named {name!r} is already registered: {existing}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_accountants() -> list[str]:
    """Names of the registered accountants, sorted."""
    return sorted(_REGISTRY)


def create_accountant(name: str, **kwargs: Any) -> Accountant:
    """Instantiate the accountant registered under ``name`` with ``kwargs``."""
    cls = _REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(
            f"unknown accountant {name!r}; known accountants: {', '.join(available_accountants())}"
        )
    return cls(**kwargs)


def accountant_from_state_dict(state: Mapping[str, Any]) -> Accountant:
    """Build the accountant named in ``state`` and load ``state`` into it."""
    if not isinstance(state, Mapping) or "name" not in state:
        raise ValueError("state_dict must be a mapping with a 'name' key")
    acc = create_accountant(state["name"])
    acc.load_state_dict(state)
    return acc
