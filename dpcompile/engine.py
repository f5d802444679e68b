"""The runtime behind a dp_compiled model: compiled private steps, padding, accumulation.

A training-mode forward with gradients enabled runs the compiled forward graph on the batch
padded to a fixed physical size (so Poisson batch sizes do not recompile), and registers an
autograd node whose backward runs the compiled private backward: per-sample norms, clipping and
the clipped sums in one pass. Padding rows get clip factor 0 and zero output gradients; the
sample-dim analysis proved they cannot influence real rows. Clipped sums are accumulated here
(not in ``p.grad``, which the user may clear) until the optimizer takes the noisy step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import TreeSpec, tree_flatten, tree_unflatten

from dpcompile.privacy import PrivacyState
from passes import analyze, capture, private_backward
from passes.capture import Capture
from passes.errors import BatchDimensionError
from passes.grad_forms import NormPlan
from passes.lower import Backend, BoxedGraph, lower_split
from passes.partition import SplitGraphs, split
from passes.rewrite import example_private_inputs
from passes.sample_dims import SampleDim
from passes.samples import pad_samples, take_samples


@dataclass
class CompiledStep:
    """Forward and private backward compiled for one physical batch signature."""

    capture: Capture
    graphs: SplitGraphs
    forward: Callable[..., Any]
    backward: BoxedGraph  # called with one list, which it empties
    padded_batch: int
    leaf_dims: list[SampleDim | None]
    seed_dims: list[SampleDim | None]
    plans: dict[str, NormPlan]
    outputs_relaid: bool = False  # the forward may return outputs in Inductor's compute layout

    @property
    def num_leaves(self) -> int:
        return len(self.leaf_dims)


def bucket_step(expected_batch_size: float) -> int:
    """Padding granularity: about two standard deviations of a Poisson batch size (2·√E), a
    power of two, at least 8. Batch sizes fall in ±3σ, so 3–4 sizes get compiled, and padding
    wastes about σ/E = 1/√E of a step on average (6% at E=256)."""
    spread = 2 * math.sqrt(max(expected_batch_size, 1.0))
    return max(8, 2 ** round(math.log2(spread)))


class Engine:
    """Compiles and runs a module's private steps; holds the clipped-sum accumulator."""

    def __init__(self, module: nn.Module, state: PrivacyState, *, backend: Backend = "inductor",
                 batch_dim: int = 0, max_physical_batch_size: int | None = None,
                 expected_batch_size: float | None = None, low_memory: bool = False) -> None:
        self.module = module
        self.low_memory = low_memory  # clipped sums from a second backward (passes.private_backward)
        self.state = state
        self.backend: Backend = backend
        self.batch_dim = batch_dim
        self.max_physical_batch_size = max_physical_batch_size
        # Samples this process sees per step on average: a rank's share in a distributed job.
        self.expected_batch_size = expected_batch_size or state.expected_batch_size
        self.step_size = bucket_step(self.expected_batch_size)
        self._steps: dict[tuple[Any, ...], CompiledStep] = {}
        self.accumulator: dict[str, torch.Tensor] = {}
        self.unclipped_count = 0.0  # samples whose norm was within C (adaptive clipping)
        self.samples_seen = 0  # real samples in the current logical batch
        self.norm_log: list[torch.Tensor] = []  # per physical batch: real rows' norms (safety checks)

    # ---- parameters ----------------------------------------------------------------------
    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    @property
    def compiled_graph_count(self) -> int:
        """Number of compiled (forward, private backward) graph pairs."""
        return len(self._steps)

    def plans(self) -> dict[str, NormPlan]:
        """How each parameter's per-sample norm is computed (latest compiled step)."""
        return next(reversed(self._steps.values())).plans if self._steps else {}

    def padded_size(self, count: int) -> int:
        size = max(2, -(-count // self.step_size) * self.step_size)
        if self.max_physical_batch_size is not None:
            size = min(size, max(2, self.max_physical_batch_size))
        return max(size, count)

    # ---- compile -------------------------------------------------------------------------
    def _flatten_call(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[torch.Tensor], TreeSpec, list[Any]]:
        leaves, spec = tree_flatten((args, kwargs))
        tensors = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]
        if not tensors:
            raise BatchDimensionError(
                f"{type(self.module).__name__} was called without tensors: nothing carries the batch"
            )
        constants = [None if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        return tensors, spec, constants

    def batch_size(self, tensors: list[torch.Tensor]) -> int:
        d = self.batch_dim
        sizes = {int(t.shape[d]) for t in tensors if t.dim() > d}
        if len(sizes) != 1 or any(t.dim() <= d for t in tensors):
            shapes = [tuple(t.shape) for t in tensors]
            raise BatchDimensionError(
                f"the tensors passed to {type(self.module).__name__} ({shapes}) do not share one "
                f"batch size along dimension {d}: every tensor argument must hold one row per "
                "sample (pass batch_dim=... to dp_compile if the batch is not dimension 0; "
                "non-batch tensors belong in the module as buffers)"
            )
        return sizes.pop()

    def _signature(self, tensors: list[torch.Tensor], spec: TreeSpec, constants: list[Any], padded: int) -> tuple[Any, ...]:
        d = self.batch_dim
        shapes = tuple(
            (tuple(s for k, s in enumerate(t.shape) if k != d), t.dtype, t.device) for t in tensors
        )
        params = tuple((n, p.dtype, p.device, p.requires_grad) for n, p in self.module.named_parameters())
        return (padded, shapes, str(spec), repr(constants), self.module.training, params)

    def compiled_step(self, tensors: list[torch.Tensor], spec: TreeSpec, constants: list[Any], padded: int) -> CompiledStep:
        key = self._signature(tensors, spec, constants, padded)
        step = self._steps.get(key)
        if step is None:
            step = self._compile(tensors, spec, constants, padded)
            self._steps[key] = step
            release_free_heap()
        return step

    def _compile(self, tensors: list[torch.Tensor], spec: TreeSpec, constants: list[Any], padded: int) -> CompiledStep:
        example = [pad_rows(t, self.batch_dim, padded) for t in tensors]

        def arguments(batch: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
            values = iter(batch)
            leaves = [next(values) if c is None else c for c in constants]
            args, kwargs = tree_unflatten(leaves, spec)
            return tuple(args), dict(kwargs)

        cap = capture(self.module, example, batch_dim=self.batch_dim, arguments=arguments)
        analysis = analyze(cap)
        inputs = example_private_inputs(cap)
        clipping = "per_layer" if self.state.clipping == "per_layer" else "flat"
        if clipping == "per_layer":
            inputs[-1] = inputs[-1].expand(len(cap.grad_for)).clone()
        private = private_backward(cap, analysis, clipping, inputs, nonfinite=self.state.nonfinite,  # type: ignore[arg-type]
                                   low_memory=self.low_memory)
        graphs = split(private)
        forward, backward, outputs_relaid = lower_split(graphs, self.backend)
        # Tracing needed the padded batch's values; the step needs only the seeds' shapes. Keep no
        # copy of the batch alive with the step (3 MiB for the CIFAR-10 CNN at batch 256).
        first = cap.num_params + len(cap.buffers)
        batch_examples = cap.example_inputs[first : first + cap.num_batch]
        cap.example_inputs[first : first + cap.num_batch] = [t.to("meta") for t in batch_examples]
        leaf_dims = []
        output = next(n for n in cap.graph_module.graph.nodes if n.op == "output")
        for leaf in list(output.args[0])[: len(cap.output_is_differentiable)]:
            info = analysis.of(leaf)
            leaf_dims.append(info if isinstance(info, SampleDim) else None)
        seed_dims = [d for d, diff in zip(leaf_dims, cap.output_is_differentiable) if diff]
        return CompiledStep(
            capture=cap,
            graphs=graphs,
            forward=forward,
            backward=backward,
            outputs_relaid=outputs_relaid,
            padded_batch=padded,
            leaf_dims=leaf_dims,
            seed_dims=seed_dims,
            plans=private.plans,
        )

    def warm_up(self, args: tuple[Any, ...]) -> None:
        """Compile the graphs for the expected batch size in the module's current train/eval mode
        and run them once, with no effect on parameters or accumulators."""
        try:
            tensors, spec, constants = self._flatten_call(args, {})
            count = self.batch_size(tensors)
            padded = self.padded_size(max(count, round(self.expected_batch_size)))
            step = self.compiled_step(tensors, spec, constants, padded)
            batch = [pad_rows(t, self.batch_dim, padded) for t in tensors]
            with torch.no_grad():
                _, saved = self.run_forward(step, [p for _, p in self.trainable()], batch)
                examples = step.capture.example_inputs
                seeds = [torch.zeros_like(s) for s in examples[len(examples) - step.capture.num_outputs :]]
                self.run_backward(step, saved, seeds, 0)
        finally:
            self.reset()

    # ---- run -----------------------------------------------------------------------------
    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        tensors, spec, constants = self._flatten_call(args, kwargs)
        count = self.batch_size(tensors)
        padded = self.padded_size(count)
        step = self.compiled_step(tensors, spec, constants, padded)
        batch = [pad_rows(t, self.batch_dim, padded) for t in tensors]
        params = [p for _, p in self.trainable()]
        leaves = _PrivateStep.apply(self, step, count, batch, *params)
        return tree_unflatten(list(leaves), step.capture.output_spec)

    def run_forward(self, step: CompiledStep, params: list[torch.Tensor], batch: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        named = dict(self.module.named_parameters())
        buffers = dict(self.module.named_buffers())
        cap = step.capture
        flat = [*params, *(named[n] for n in cap.frozen), *(buffers[n] for n in cap.buffers), *batch]
        out = step.forward(*flat)
        leaves = list(out[: step.num_leaves])
        if step.outputs_relaid:  # model outputs back in the contiguous layout eager gives them
            leaves = [t.contiguous() if isinstance(t, torch.Tensor) else t for t in leaves]
        return leaves, list(out[step.num_leaves :])

    def run_backward(self, step: CompiledStep, saved: list[torch.Tensor], seeds: list[torch.Tensor], count: int) -> list[torch.Tensor | None]:
        """The clipped per-sample gradient sums of one physical batch, by trainable parameter.

        ``saved`` is consumed: the call empties it, and the caller must hold no other reference
        to the saved values (the backward frees each at its last use, and may write into it)."""
        ref = self.trainable()[0][1]  # mask and bound were traced with this dtype and device
        padded = step.padded_batch
        mask = torch.zeros(padded, dtype=ref.dtype, device=ref.device)
        mask[:count] = 1
        clip = self.clip_bound_tensor(step, ref)
        # Boxed: the compiled backward empties the list and frees each saved value at last use.
        saved.extend((*seeds, mask, clip))
        out = step.backward(saved)
        norms, clipped = out[0], out[1:]
        self._record(step, clipped, norms[:count], count)
        by_name = dict(zip((step.capture.trainable[k] for k in step.capture.grad_for), clipped))
        return [by_name.get(name) for name, _ in self.trainable()]

    def clip_bound_tensor(self, step: CompiledStep, ref: torch.Tensor) -> torch.Tensor:
        bound = self.state.max_grad_norm
        if isinstance(bound, list):
            names = [n for n, _ in self.trainable()]
            by_name = dict(zip(names, bound))
            values = [by_name[step.capture.trainable[k]] for k in step.capture.grad_for]
            return torch.tensor(values, dtype=ref.dtype, device=ref.device)
        return torch.tensor(float(bound), dtype=ref.dtype, device=ref.device)

    def _record(self, step: CompiledStep, clipped: list[torch.Tensor], norms: torch.Tensor, count: int) -> None:
        names = [step.capture.trainable[k] for k in step.capture.grad_for]
        for name, grad in zip(names, clipped):
            if name in self.accumulator:
                self.accumulator[name].add_(grad)
            else:
                self.accumulator[name] = grad.detach().clone()
        if self.state.adaptive is not None and count:
            self.unclipped_count += float((norms <= float(self.state.max_grad_norm)).sum())  # type: ignore[arg-type]
        self.samples_seen += count
        self.norm_log.append(norms)

    def reset(self) -> None:
        self.accumulator.clear()
        self.unclipped_count = 0.0
        self.samples_seen = 0
        self.norm_log.clear()


def release_free_heap() -> None:
    """Give the heap that tracing and compiling freed back to the operating system (glibc).

    Tracing and Inductor allocate and free a lot; glibc keeps the freed memory mapped, so after
    compiling a 2-layer transformer the process measured 1.5 GB resident of which 1.2 GB was free
    heap (292 MB after ``malloc_trim``). Compiles are rare, so trimming after each costs little.
    """
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows, musl): nothing to do


def pad_rows(t: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Pad ``t`` along ``dim`` to ``size`` rows by repeating its first row (zeros if empty)."""
    count = t.shape[dim]
    if count == size:
        return t
    shape = list(t.shape)
    shape[dim] = size - count
    if count == 0:
        filler = t.new_zeros(shape)
    else:
        filler = t.narrow(dim, 0, 1).expand(shape)
    return torch.cat([t, filler], dim)


class _PrivateStep(torch.autograd.Function):
    """Forward: the compiled forward graph. Backward: the compiled private backward."""

    @staticmethod
    def forward(ctx: Any, engine: Engine, step: CompiledStep, count: int, batch: list[torch.Tensor],
                *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        leaves, saved = engine.run_forward(step, list(params), batch)
        outputs = []
        for leaf, sd in zip(leaves, step.leaf_dims):
            outputs.append(take_samples(leaf, sd, step.padded_batch, count) if sd is not None else leaf)
        ctx.engine, ctx.step, ctx.count = engine, step, count
        ctx.backward_ran = False
        ctx.save_for_backward(*saved)
        ctx.set_materialize_grads(False)
        for out, differentiable in zip(outputs, step.capture.output_is_differentiable):
            if not differentiable:
                ctx.mark_non_differentiable(out)
        return tuple(outputs)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        if ctx.backward_ran:
            # A second pass would add this batch's clipped gradients twice (the accountant counts
            # each batch once), and the compiled backward may have overwritten its saved values.
            raise RuntimeError(
                "dpcompile: backward ran twice through the same private step (retain_graph=True); "
                "each batch's private gradients can be taken once. Run the model forward again "
                "for another backward, or combine the losses and call backward once."
            )
        ctx.backward_ran = True
        engine: Engine = ctx.engine
        step: CompiledStep = ctx.step
        count: int = ctx.count
        scale = float(count) if engine.state.loss_reduction == "mean" else 1.0
        seeds = []
        diff_grads = [g for g, d in zip(grads, step.capture.output_is_differentiable) if d]
        examples = step.capture.example_inputs[len(step.capture.example_inputs) - step.capture.num_outputs :]
        for grad, sd, example in zip(diff_grads, step.seed_dims, examples):
            if grad is None:
                seeds.append(torch.zeros_like(example))
            elif sd is None:
                seeds.append(grad)
            else:
                # Output gradients of a mean loss are 1/n of each sample's gradient.
                seeds.append(pad_samples(grad * scale, sd, count, step.padded_batch))
        saved = list(ctx.saved_tensors)
        # Drop the autograd node's references too (no retain_graph: a second backward raises
        # above), so the compiled backward frees each saved value at its last use.
        clear_saved = getattr(ctx, "maybe_clear_saved_tensors", None)
        if clear_saved is not None:
            clear_saved()
        clipped = engine.run_backward(step, saved, seeds, count)
        return (None, None, None, None, *clipped)
