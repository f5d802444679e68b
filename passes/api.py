"""The compiler's public entry: per-sample gradient norms and clipped sums for a model and loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from passes.capture import Capture, capture
from passes.grad_forms import NormPlan
from passes.lower import Backend, lower
from passes.rewrite import Clipping, PrivateGraph, example_private_inputs, private_backward
from passes.sample_dims import analyze


@dataclass
class PerSampleResult:
    """One batch's result."""

    per_sample_norms: torch.Tensor  # (B,) flat; (B, P) per-layer, P = len(clipped_grads)
    clipped_grads: dict[str, torch.Tensor]  # Σ_b c_b · g_b per trainable parameter with a gradient
    outputs: Any  # what the loss returned: the per-sample losses (B,)


@dataclass
class CompiledStep:
    """One compiled private graph for one batch signature."""

    private: PrivateGraph
    run: Callable[..., Any]

    @property
    def capture(self) -> Capture:
        return self.private.capture


class PerSampleGradients:
    """Compile ``loss_fn(model(*inputs), *targets)`` into per-sample norms and clipped sums.

    ``loss_fn`` returns one loss per sample (shape ``(B,)``). Calling the object with a batch
    returns the per-sample gradient norms and ``Σ_b c_b·g_b`` with ``c_b = mask_b·min(1, C/‖g_b‖)``:
    one C for all parameters (``clipping="flat"``) or one per trainable parameter
    (``clipping="per_layer"``). The rewritten graph runs through Inductor (``backend="inductor"``)
    or as a plain FX graph (``backend="eager"``). ``low_memory`` takes flat clipping's clipped sums
    from a second backward (see :func:`passes.private_backward`). A graph is compiled once per batch signature
    (shapes, dtypes, devices); ``num_compiled`` counts them.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable[..., torch.Tensor],
        *,
        clipping: Clipping = "flat",
        backend: Backend = "inductor",
        batch_dim: int | Sequence[int] = 0,
        low_memory: bool = False,
    ) -> None:
        if clipping not in ("flat", "per_layer"):
            raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
        if backend not in ("inductor", "eager"):
            raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.clipping: Clipping = clipping
        self.backend: Backend = backend
        self.batch_dim = batch_dim
        self.low_memory = low_memory
        self._compiled: dict[tuple[Any, ...], CompiledStep] = {}

    @property
    def num_compiled(self) -> int:
        return len(self._compiled)

    def plans(self) -> dict[str, NormPlan]:
        """How each parameter's norm is computed, for the most recently compiled graph."""
        if not self._compiled:
            return {}
        return next(reversed(self._compiled.values())).private.plans

    def compile(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> CompiledStep:
        key = self._signature(inputs, targets)
        step = self._compiled.get(key)
        if step is None:
            cap = capture(self.model, inputs, self.loss_fn, targets, batch_dim=self.batch_dim)
            analysis = analyze(cap)
            example = example_private_inputs(cap)
            if self.clipping == "per_layer":
                example[-1] = example[-1].expand(len(cap.grad_for)).clone()
            private = private_backward(cap, analysis, self.clipping, example, low_memory=self.low_memory)
            step = CompiledStep(private, lower(private.graph_module, self.backend))
            self._compiled[key] = step
        return step

    def __call__(
        self,
        inputs: Sequence[torch.Tensor] | torch.Tensor,
        targets: Sequence[torch.Tensor] | torch.Tensor = (),
        *,
        max_grad_norm: float | Sequence[float] | Mapping[str, float] | torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> PerSampleResult:
        batch_inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
        batch_targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
        if _batch_size(batch_inputs, self.batch_dim) == 1:
            # A batch of one is ambiguous to the analysis (size-1 dimensions can be reshaped
            # anywhere): run two copies with the second masked out.
            return self._single(batch_inputs, batch_targets, max_grad_norm, mask)
        step = self.compile(batch_inputs, batch_targets)
        cap = step.capture
        named = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        ref = named[cap.trainable[0]]
        batch = cap.batch_size
        if mask is None:
            mask_t = torch.ones(batch, dtype=ref.dtype, device=ref.device)
        else:
            if mask.shape != (batch,):
                raise ValueError(f"mask must have shape ({batch},), got {tuple(mask.shape)}")
            mask_t = mask.to(device=ref.device, dtype=ref.dtype)
        clip = self._max_grad_norm(max_grad_norm, cap, ref)
        seeds = cap.example_inputs[len(cap.example_inputs) - cap.num_outputs :]  # ones
        flat = [
            *(named[n].detach() for n in cap.trainable),
            *(named[n].detach() for n in cap.frozen),
            *(buffers[n] for n in cap.buffers),
            *batch_inputs,
            *batch_targets,
            *seeds,
            mask_t,
            clip,
        ]
        out = step.run(*flat)
        num_leaves = len(cap.output_is_differentiable)
        names = [cap.trainable[k] for k in cap.grad_for]
        outputs = out[0] if num_leaves == 1 else tuple(out[:num_leaves])
        return PerSampleResult(
            per_sample_norms=out[num_leaves],
            clipped_grads=dict(zip(names, out[num_leaves + 1 :])),
            outputs=outputs,
        )

    # ---- helpers -------------------------------------------------------------------------
    def _single(self, inputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...],
                max_grad_norm: Any, mask: torch.Tensor | None) -> PerSampleResult:
        dims = _batch_dims(self.batch_dim, len(inputs))
        doubled_inputs = tuple(torch.cat([x, x], d) for x, d in zip(inputs, dims))
        doubled_targets = tuple(torch.cat([y, y], 0) for y in targets)
        ref = next(iter(self.model.parameters()))
        keep = torch.ones(1, dtype=ref.dtype, device=ref.device) if mask is None else mask.to(ref)
        doubled_mask = torch.cat([keep, torch.zeros_like(keep)])
        result = self(doubled_inputs, doubled_targets, max_grad_norm=max_grad_norm, mask=doubled_mask)
        outputs = result.outputs
        outputs = outputs[:1] if isinstance(outputs, torch.Tensor) else tuple(o[:1] for o in outputs)
        return PerSampleResult(result.per_sample_norms[:1], result.clipped_grads, outputs)

    def _signature(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> tuple[Any, ...]:
        def sig(t: Any) -> Any:
            if isinstance(t, torch.Tensor):
                return (tuple(t.shape), t.dtype, t.device.type, t.device.index)
            return (type(t).__name__, t)

        params = tuple(
            (n, p.dtype, p.device.type, p.requires_grad) for n, p in self.model.named_parameters()
        )
        return (tuple(sig(t) for t in inputs), tuple(sig(t) for t in targets), params)

    def _max_grad_norm(self, value: Any, cap: Capture, ref: torch.Tensor) -> torch.Tensor:
        with_grads = [cap.trainable[k] for k in cap.grad_for]
        if self.clipping == "flat":
            if isinstance(value, torch.Tensor):
                c = value.to(device=ref.device, dtype=ref.dtype).reshape(())
            elif isinstance(value, (int, float)):
                c = torch.tensor(float(value), dtype=ref.dtype, device=ref.device)
            else:
                raise ValueError(
                    "flat clipping takes one max_grad_norm (a float); per-layer clipping "
                    "takes one per parameter: pass clipping='per_layer'"
                )
            if not bool(c > 0):
                raise ValueError(f"max_grad_norm must be > 0, got {float(c)}")
            return c
        if isinstance(value, Mapping):
            missing = [n for n in with_grads if n not in value]
            if missing:
                raise ValueError(f"max_grad_norm has no entry for parameters {missing}")
            values = [float(value[n]) for n in with_grads]
        else:
            values_list = [float(v) for v in (value.tolist() if isinstance(value, torch.Tensor) else value)]
            if len(values_list) != len(cap.trainable):
                raise ValueError(
                    f"per-layer clipping needs one max_grad_norm per trainable parameter "
                    f"({len(cap.trainable)}), got {len(values_list)}"
                )
            by_name = dict(zip(cap.trainable, values_list))
            values = [by_name[n] for n in with_grads]
        if any(not v > 0 for v in values):
            raise ValueError(f"every max_grad_norm must be > 0, got {values}")
        return torch.tensor(values, dtype=ref.dtype, device=ref.device)


def _batch_dims(batch_dim: int | Sequence[int], n: int) -> list[int]:
    return [batch_dim] * n if isinstance(batch_dim, int) else list(batch_dim)


def _batch_size(inputs: Sequence[torch.Tensor], batch_dim: int | Sequence[int]) -> int | None:
    dims = _batch_dims(batch_dim, len(inputs))
    for x, d in zip(inputs, dims):
        if isinstance(x, torch.Tensor) and x.dim() > d:
            return int(x.shape[d])
    return None
