"""capture: trace a model's forward, an optional per-sample loss and the backward into one aten graph.

The captured function is

    joint(*trainable, *frozen, *buffers, *batch, *seeds) -> (*outputs, *grads)

where ``grads = autograd.grad(outputs, trainable, seeds)``. The backward is linear in ``seeds``;
the seed of output ``k`` has that output's shape. With a per-sample loss the single output is the
vector of per-sample losses and its seed is a vector of per-sample weights; without one, the
outputs are the model's outputs and the seeds are the gradients a caller's loss sends back.

The graph is functional (no in-place ops), decomposed to core aten except for the ops the
per-sample rules know, and every forward node records the module it was traced in
(``node.meta["custom"]["dp_module"]``) so that errors can name it.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
from torch import nn
from torch._decomp import core_aten_decompositions
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensorMode,
)
from torch.func import functional_call, functionalize
from torch.fx.experimental.proxy_tensor import get_proxy_mode, make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode
from torch.utils._pytree import TreeSpec, tree_flatten

from passes.errors import BatchDimensionError, LossError, OutputError, UnsupportedOpError
from passes.rnn import recurrences_as_scans

aten = torch.ops.aten

# What tracing with fake tensors raises where the model branches on, or reads, a tensor's value.
_DATA_DEPENDENT = (
    GuardOnDataDependentSymNode,
    DataDependentOutputException,
    DynamicOutputShapeException,
)

# Ops kept whole: per-sample rules know them (see passes/per_sample_rules.py), or their
# decomposition does not match the fused backward kernel they are paired with (the CPU flash
# attention decomposition's logsumexp gives wrong in_proj gradients in torch 2.13).
KEPT_OPS = (
    aten.embedding_dense_backward.default,
    aten.convolution_backward.default,
    aten._embedding_bag_backward.default,
    aten._scaled_dot_product_flash_attention_for_cpu.default,
    aten._scaled_dot_product_efficient_attention.default,
    aten._scaled_dot_product_flash_attention.default,
    aten._scaled_dot_product_cudnn_attention.default,
)


@functools.lru_cache(maxsize=1)
def _decompositions() -> tuple[tuple[Any, Callable[..., Any]], ...]:
    table = dict(core_aten_decompositions())
    for op in KEPT_OPS:
        table.pop(op, None)
    return tuple(table.items())


def decomposition_table() -> dict[Any, Callable[..., Any]]:
    """Core aten decompositions, minus the ops the per-sample rules handle directly."""
    return dict(_decompositions())


def trace(fn: Callable[..., Any], *inputs: torch.Tensor) -> fx.GraphModule:
    """``fn`` as an aten graph, traced with fake tensors: shapes only, no compute, and one fake
    mode for every node's value (a real-tensor trace gives each node its own, each keeping a
    stack trace for as long as the graph lives)."""
    return make_fx(fn, decomposition_table=decomposition_table(), tracing_mode="fake")(*inputs)


def _probe(run_forward: Callable[..., Any], values: dict[str, torch.Tensor], batch: Sequence[torch.Tensor]) -> Any:
    """``run_forward``'s outputs on fake tensors: their structure, shapes and dtypes, with no compute.

    An eager forward at the traced batch size allocated every activation while compiling and, on
    CPU, left NNPACK's convolution workspace behind for good: 14 MiB for the CIFAR-10 CNN at
    batch 256 (heaptrack), against none for ``torch.compile``, which traces with fake tensors.
    A forward that fake tensors cannot run (a custom op without a fake kernel, a value read)
    runs eagerly, as before; the trace that follows reports what it cannot capture."""
    mode = FakeTensorMode()
    try:
        fake_values = {name: mode.from_tensor(v) for name, v in values.items()}
        fake_batch = [mode.from_tensor(t) for t in batch]
        with mode:
            return run_forward(fake_values, fake_batch)
    except Exception:
        return run_forward(values, batch)


def _ones_like(leaf: torch.Tensor) -> torch.Tensor:
    """A real tensor of ones laid out as ``torch.ones_like`` lays out ``leaf`` (fake or real)."""
    like = torch.empty_strided(leaf.shape, leaf.stride(), dtype=leaf.dtype, device=leaf.device)
    return torch.ones_like(like)


@dataclass
class Capture:
    """A captured joint forward+backward graph and the layout of its inputs and outputs."""

    graph_module: fx.GraphModule
    trainable: list[str]  # parameter names with gradients, in input order
    frozen: list[str]  # parameters without gradients: inputs, like buffers
    buffers: list[str]
    num_batch: int  # batch tensors (inputs, then loss targets)
    batch_dims: list[int]  # sample dimension of each batch tensor
    num_outputs: int  # differentiated outputs (= number of seeds)
    output_spec: TreeSpec  # pytree structure of the model's (or loss's) output
    output_is_differentiable: list[bool]  # per output leaf: has a seed
    grad_for: list[int]  # indices into `trainable` of the grads the graph returns
    batch_size: int
    loss_mode: bool
    example_inputs: list[torch.Tensor] = field(default_factory=list)  # real values, input order

    @property
    def num_params(self) -> int:
        return len(self.trainable) + len(self.frozen)

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph_module.graph.nodes if n.op == "placeholder"]

    def seed_placeholders(self) -> list[fx.Node]:
        return self.placeholders()[len(self.placeholders()) - self.num_outputs :]

    def batch_placeholders(self) -> list[fx.Node]:
        start = self.num_params + len(self.buffers)
        return self.placeholders()[start : start + self.num_batch]


@contextlib.contextmanager
def rnn_as_matmuls() -> Iterator[None]:
    """Trace RNNs as per-step matmuls instead of the opaque oneDNN / cuDNN kernels."""
    with warnings.catch_warnings():
        # Toggling the oneDNN flags warns about Intel GPUs; irrelevant here.
        warnings.filterwarnings("ignore", message="TF32 acceleration on top of oneDNN")
        with torch.backends.mkldnn.flags(enabled=False), torch.backends.cudnn.flags(
            enabled=False
        ):
            yield


class _ModuleScopes:
    """Records, for every node traced inside a module's forward, that module's qualified name."""

    def __init__(self, model: nn.Module) -> None:
        self.names: dict[int, str] = {}
        for name, module in model.named_modules(remove_duplicate=False):
            self.names.setdefault(id(module), name)
        self.stack: list[tuple[str, str]] = []
        self.last: fx.Node | None = None

    def _flush(self) -> None:
        mode = get_proxy_mode()
        if mode is None:
            return
        graph = mode.tracer.graph
        node = self.last.next if self.last is not None else next(iter(graph.nodes), None)
        name, kind = self.stack[-1] if self.stack else ("", "")
        while node is not None and node.op != "root":
            custom = node.meta.setdefault("custom", {})
            custom["dp_module"], custom["dp_module_type"] = name, kind
            self.last = node
            node = node.next

    def current(self, model: nn.Module) -> str:
        """The module whose forward is being traced, for an error message."""
        name, kind = self.stack[-1] if self.stack else ("", type(model).__name__)
        return f"module {_module_label(name, kind)}" if name else _module_label(name, kind)

    def _pre(self, module: nn.Module, args: Any) -> None:
        self._flush()
        self.stack.append((self.names.get(id(module), ""), type(module).__name__))

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        self._flush()
        if self.stack:
            self.stack.pop()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        pre = nn.modules.module.register_module_forward_pre_hook(self._pre)
        post = nn.modules.module.register_module_forward_hook(self._post)
        try:
            yield
        finally:
            self._flush()
            pre.remove()
            post.remove()


def node_module(node: fx.Node) -> str | None:
    """'encoder.norm (BatchNorm1d)': the module a node was traced in, if known."""
    custom = node.meta.get("custom") or {}
    kind = custom.get("dp_module_type")
    if not kind:
        return None
    return _module_label(custom.get("dp_module") or "", kind)


def _module_label(name: str, kind: str) -> str:
    return f"`{name}` ({kind})" if name else f"the model's own forward ({kind})"


def _as_tuple(batch: Any) -> tuple[Any, ...]:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def _check_batch(tensors: Sequence[torch.Tensor], dims: Sequence[int], what: str) -> int:
    sizes = set()
    for k, (t, d) in enumerate(zip(tensors, dims)):
        if not isinstance(t, torch.Tensor):
            raise BatchDimensionError(
                f"{what} {k} is a {type(t).__name__}, not a tensor: pass batch data as tensors "
                "(non-tensor arguments belong in the model or the loss function)"
            )
        if t.dim() <= d:
            raise BatchDimensionError(
                f"{what} {k} has shape {tuple(t.shape)} and no dimension {d} to hold the batch: "
                "inputs need a batch dimension (use x.unsqueeze(0) for a single sample, or pass "
                "batch_dim=...)"
            )
        sizes.add(t.shape[d])
    if len(sizes) > 1:
        raise BatchDimensionError(
            f"{what}s disagree on the batch size ({sorted(sizes)} along their batch dimensions "
            f"{list(dims)}): every batch tensor must hold one row per sample along its batch "
            "dimension (pass batch_dim=... if the batch is not dimension 0)"
        )
    return sizes.pop()


def capture(
    model: nn.Module,
    inputs: Sequence[torch.Tensor],
    loss_fn: Callable[..., torch.Tensor] | None = None,
    targets: Sequence[torch.Tensor] = (),
    *,
    batch_dim: int | Sequence[int] = 0,
    arguments: Callable[[Sequence[torch.Tensor]], tuple[tuple[Any, ...], dict[str, Any]]] | None = None,
) -> Capture:
    """Trace ``model(*inputs)`` (then ``loss_fn(output, *targets)``) and its backward to aten.

    ``arguments`` rebuilds the model's call ``(args, kwargs)`` from the batch tensors, for models
    called with keyword or nested arguments; by default the inputs are the positional arguments.
    """
    inputs = _as_tuple(inputs)
    targets = _as_tuple(targets) if loss_fn is not None else ()
    batch = (*inputs, *targets)
    if isinstance(batch_dim, int):
        batch_dims = [batch_dim] * len(inputs) + [0] * len(targets)
    else:
        batch_dims = list(batch_dim) + [0] * len(targets)
        if len(batch_dims) != len(batch):
            raise BatchDimensionError(
                f"batch_dim lists {len(batch_dim)} dimensions for {len(inputs)} inputs"
            )
    if not inputs:
        raise BatchDimensionError("the model needs at least one batch input tensor")
    batch_size = _check_batch(batch, batch_dims, "batch tensor")
    if batch_size < 2:
        # Size-1 dimensions can be reshaped anywhere, so one sample cannot be tracked.
        raise BatchDimensionError(
            "capture needs at least 2 samples to track the batch dimension; pad a single "
            "sample with a masked copy (PerSampleGradients does this)"
        )

    trainable: list[str] = []
    frozen: list[str] = []
    for name, p in model.named_parameters():
        (trainable if p.requires_grad else frozen).append(name)
    if not trainable:
        raise OutputError(f"{type(model).__name__} has no trainable parameters to train privately")
    named = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    buffer_names = list(buffers)

    def run_forward(values: dict[str, torch.Tensor], batch_values: Sequence[torch.Tensor]) -> Any:
        model_inputs = batch_values[: len(inputs)]
        kwargs: dict[str, Any]
        if arguments is None:
            args, kwargs = tuple(model_inputs), {}
        else:
            args, kwargs = arguments(model_inputs)
        out = functional_call(model, values, args, kwargs, strict=False)
        if loss_fn is not None:
            out = loss_fn(out, *batch_values[len(inputs) :])
        return out

    # One forward for the output structure, which outputs need seeds, and their shapes.
    with torch.no_grad(), rnn_as_matmuls():
        probe = _probe(run_forward, {**named, **buffers}, batch)
    leaves, spec = tree_flatten(probe)
    for k, leaf in enumerate(leaves):
        if not isinstance(leaf, torch.Tensor):
            raise OutputError(
                f"{'loss_fn' if loss_fn else type(model).__name__} returned a "
                f"{type(leaf).__name__} (output leaf {k}); only tensors can be differentiated: "
                "return tensors, or compute non-tensor values outside the model"
            )
    if loss_fn is not None:
        if len(leaves) != 1 or tuple(leaves[0].shape) != (batch_size,):
            shapes = [tuple(t.shape) for t in leaves]
            raise LossError(
                f"loss_fn must return one loss per sample, a tensor of shape ({batch_size},); "
                f"it returned shape{'s' if len(shapes) > 1 else ''} "
                f"{shapes if len(shapes) > 1 else shapes[0]}. Use reduction='none' "
                "(e.g. F.cross_entropy(out, y, reduction='none')) and reduce over every "
                "non-batch dimension."
            )
    differentiable = [leaf.is_floating_point() or leaf.is_complex() for leaf in leaves]
    seeds = [_ones_like(leaf) for leaf, d in zip(leaves, differentiable) if d]
    if not seeds:
        raise OutputError(f"{type(model).__name__} has no floating-point output to differentiate")

    scopes = _ModuleScopes(model)
    grad_for: list[int] = []
    n_train, n_frozen, n_buf, n_batch = len(trainable), len(frozen), len(buffer_names), len(batch)

    def joint(*flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        values = dict(zip(trainable, flat[:n_train]))
        values.update(zip(frozen, flat[n_train : n_train + n_frozen]))
        values.update(zip(buffer_names, flat[n_train + n_frozen : n_train + n_frozen + n_buf]))
        start = n_train + n_frozen + n_buf
        batch_values = flat[start : start + n_batch]
        seed_values = flat[start + n_batch :]
        with scopes.recording(), recurrences_as_scans():
            out = run_forward(values, batch_values)
        out_leaves, _ = tree_flatten(out)
        diff = [leaf for leaf, d in zip(out_leaves, differentiable) if d]
        needed = [(leaf, s) for leaf, s in zip(diff, seed_values) if leaf.requires_grad]
        params = flat[:n_train]
        if needed:
            grads = torch.autograd.grad(
                [leaf for leaf, _ in needed],
                params,
                [s for _, s in needed],
                allow_unused=True,
            )
        else:
            grads = (None,) * n_train  # type: ignore[assignment]
        grad_for.clear()
        grad_for.extend(k for k, g in enumerate(grads) if g is not None)
        return (*out_leaves, *(g for g in grads if g is not None))

    flat_inputs = [
        *(named[n].detach().requires_grad_(True) for n in trainable),
        *(named[n].detach() for n in frozen),
        *(b.detach() for b in buffers.values()),
        *(t.detach() for t in batch),
        *seeds,
    ]
    with rnn_as_matmuls():
        try:
            traced = trace(joint, *flat_inputs)
        except _DATA_DEPENDENT as error:
            where = scopes.current(model)
            first = str(error).strip().splitlines()[0][:200]
            raise UnsupportedOpError(
                f"{where} reads a tensor's value to decide what to compute ({first}). dpcompile "
                "traces one graph per batch shape, so the computation cannot depend on the data's "
                "values: replace Python branches on tensors with torch.where, and .item(), "
                ".tolist() or nonzero() with tensor ops"
            ) from None
        except AssertionError as error:
            # FakeTensor's refusal of a real tensor the forward reads that is no input of the
            # trace: a plain attribute or a global, not a parameter or a buffer.
            if "convert all Tensors to FakeTensors" not in str(error):
                raise
            where = scopes.current(model)
            raise UnsupportedOpError(
                f"{where} reads a tensor that is neither a parameter nor a buffer (a plain "
                "attribute or a global), which the traced step cannot take as an input: register "
                "it with `self.register_buffer(name, tensor, persistent=False)` (it then also "
                "follows the module's device and dtype)"
            ) from None
        for node in traced.graph.nodes:
            node.meta.setdefault("custom", {})

        def replay(*args: torch.Tensor) -> Any:
            with fx_traceback.preserve_node_meta():
                return fx.Interpreter(traced).run(*args)

        plain_inputs = [t.detach() for t in flat_inputs]
        graph_module = trace(functionalize(replay), *plain_inputs)
    if not grad_for:
        raise OutputError(
            f"no trainable parameter of {type(model).__name__} influences its output: "
            "nothing to train"
        )
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return Capture(
        graph_module=graph_module,
        trainable=trainable,
        frozen=frozen,
        buffers=buffer_names,
        num_batch=len(batch),
        batch_dims=batch_dims,
        num_outputs=len(seeds),
        output_spec=spec,
        output_is_differentiable=differentiable,
        grad_for=list(grad_for),
        batch_size=batch_size,
        loss_mode=loss_fn is not None,
        example_inputs=[t.detach() for t in flat_inputs],
    )
