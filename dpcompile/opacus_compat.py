"""Opacus 1.6's ``PrivacyEngine`` on top of :func:`dp_compile`: switch by changing one import.

    from dpcompile import PrivacyEngine          # was: from opacus import PrivacyEngine

Arguments that only configure Opacus internals are accepted and ignored, and documented here:

- ``grad_sample_mode`` ("hooks", "ghost", "functorch", "ew"): dpcompile has one mechanism, the
  compiled rewrite, which chooses ghost norms or materialized per-sample gradients per layer by
  cost. With ``grad_sample_mode="ghost"`` and a ``criterion``, the 4-tuple
  ``(module, optimizer, criterion, data_loader)`` is returned as Opacus does; the criterion is
  returned unchanged (no double-backward wrapper is needed).
- ``wrap_model``: the model is always wrapped (``PrivateModule``; its ``state_dict`` has the
  original keys).
- ``rand_on_empty``: empty Poisson batches always take a noise-only step.
- ``batch_first``: maps to ``batch_dim`` (0 or 1).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpcompile.accounting import Accountant, create_accountant
from dpcompile.api import dp_compile
from dpcompile.data import PhysicalBatches
from dpcompile.optimizer import DPOptimizer
from dpcompile.privacy import AdaptiveClipping

_ADAPTIVE_KEYS = {
    "target_unclipped_quantile": "target_unclipped_quantile",
    "clipbound_learning_rate": "clipbound_learning_rate",
    "max_clipbound": "max_clipbound",
    "min_clipbound": "min_clipbound",
    "unclipped_num_std": "count_noise_std",
}
_DP_COMPILE_KEYS = {"max_physical_batch_size", "backend", "sample_rate", "noise_generator"}


class PrivacyEngine:
    """Opacus-compatible entry point: ``make_private``, ``make_private_with_epsilon``, ``get_epsilon``."""

    def __init__(self, *, accountant: str = "prv", secure_mode: bool = False) -> None:
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self.accountant: Accountant = create_accountant(accountant)

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float | Sequence[float],
        criterion: Any = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Any = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        rand_on_empty: bool = False,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Same arguments and return values as Opacus 1.6 (see the module docstring)."""
        return self._make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            grad_sample_mode=grad_sample_mode, max_grad_norm=max_grad_norm, batch_first=batch_first,
            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
            noise_generator=noise_generator, noise_multiplier=noise_multiplier, **kwargs,
        )

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float | Sequence[float],
        criterion: Any = None,
        batch_first: bool = True,
        loss_reduction: str = "mean",
        poisson_sampling: bool = True,
        clipping: str = "flat",
        noise_generator: Any = None,
        grad_sample_mode: str = "hooks",
        wrap_model: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, ...]:
        """Calibrates σ for (target_epsilon, target_delta) over ``epochs`` epochs, then make_private."""
        return self._make_private(
            module=module, optimizer=optimizer, data_loader=data_loader, criterion=criterion,
            grad_sample_mode=grad_sample_mode, max_grad_norm=max_grad_norm, batch_first=batch_first,
            loss_reduction=loss_reduction, poisson_sampling=poisson_sampling, clipping=clipping,
            noise_generator=noise_generator, target_epsilon=target_epsilon,
            target_delta=target_delta, epochs=epochs, **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """ε spent so far by the model made private last."""
        return float(self.accountant.epsilon(delta))

    def _make_private(self, *, module: nn.Module, optimizer: Optimizer, data_loader: DataLoader,
                      criterion: Any, grad_sample_mode: str, batch_first: bool, **kwargs: Any) -> tuple[Any, ...]:
        adaptive = {ours: kwargs.pop(theirs) for theirs, ours in _ADAPTIVE_KEYS.items() if theirs in kwargs}
        passthrough = {k: kwargs.pop(k) for k in list(kwargs) if k in _DP_COMPILE_KEYS}
        known = {"noise_multiplier", "target_epsilon", "target_delta", "epochs", "max_grad_norm",
                 "loss_reduction", "poisson_sampling", "clipping"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"make_private got unexpected arguments {unknown}")
        model, private_optimizer, loader = dp_compile(
            module, optimizer, data_loader,
            accountant=self.accountant_name,
            secure_mode=self.secure_mode,
            batch_dim=0 if batch_first else 1,
            adaptive_clipping=AdaptiveClipping(**adaptive) if adaptive else None,
            **passthrough,
            **kwargs,
        )
        self.accountant = model.privacy.accountant
        if grad_sample_mode == "ghost" and criterion is not None:
            return model, private_optimizer, criterion, loader
        return model, private_optimizer, loader


@contextmanager
def BatchMemoryManager(*, data_loader: Any, max_physical_batch_size: int,  # noqa: N802 (Opacus's name)
                       optimizer: DPOptimizer) -> Iterator[Any]:
    """Opacus's ``BatchMemoryManager``: iterate physical batches of at most the given size;
    the optimizer steps (with noise) once per logical batch."""
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError("BatchMemoryManager needs the optimizer returned by dp_compile / make_private")
    yield PhysicalBatches(data_loader, max_physical_batch_size, optimizer.signal)
