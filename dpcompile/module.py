"""The model returned by dp_compile: the user's module with a compiled private training path."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from dpcompile.engine import Engine
from dpcompile.privacy import PrivacyState


class PrivateModule(nn.Module):
    """Calls with gradients enabled go through the compiled private step (traced in the module's
    current train/eval mode); calls under ``torch.no_grad()`` / ``inference_mode`` run the wrapped
    module directly. A gradient can therefore never reach the parameters unclipped.

    The wrapped module's parameters are shared, not copied: ``state_dict()`` has the wrapped
    module's keys (no prefix), so checkpoints load into the original model.
    """

    def __init__(self, module: nn.Module, engine: Engine) -> None:
        super().__init__()
        self._module = module
        object.__setattr__(self, "_engine", engine)

    @property
    def module(self) -> nn.Module:
        return self._module

    @property
    def privacy(self) -> PrivacyState:
        """The privacy state: σ, C, q, steps, the accountant; ``privacy.epsilon(delta)``."""
        return self._engine.state

    @property
    def compiled_graph_count(self) -> int:
        """Compiled (forward, private backward) graph pairs so far: one per physical batch shape."""
        return self._engine.compiled_graph_count

    def private_step(self, batch: Any, *, loss_fn: Any, seed: int | torch.Tensor,
                     mask: torch.Tensor | None = None) -> dict[str, Any]:
        """One private step (clipped sums, counter-based noise, scaling) without changing any
        state: what ``dpcompile.export`` exports. See :func:`dpcompile.artifact.private_step`."""
        from dpcompile.artifact import private_step

        return private_step(self, batch, loss_fn=loss_fn, seed=seed, mask=mask)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled():
            return self._engine.forward(args, kwargs)
        return self._module(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._module, name)

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        return self._module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        return self._module.load_state_dict(state_dict, strict=strict, assign=assign)

    def named_parameters(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return self._module.named_parameters(prefix, recurse, remove_duplicate)

    def __repr__(self) -> str:
        return f"PrivateModule({self._module!r})"
