"""sample-dim analysis: for every node of a captured graph, which dimension indexes samples.

A value's sample structure is a :class:`SampleDim`: dimension ``dim`` has size
``outer * batch * inner`` and its index is ``(o * batch + b) * inner + i`` for sample ``b``. This
covers the layouts traced graphs produce: ``(B, T, d)`` viewed as ``(B*T, d)`` (inner = T) or an
RNN's ``(T, B, d)`` viewed as ``(T*B, d)`` (outer = T).

Propagation starts from each batch input's batch dimension and each backward seed, and follows one
rule per aten op (``SAMPLE_RULES``). An op that combines different samples yields :class:`Mixed`,
which names the op and the module it was traced in; the analysis raises
:class:`~passes.errors.SampleMixingError` when a mixed value reaches an output or a parameter
gradient. In the backward (nodes that depend on the seeds) an op that sums over the sample dimension
is a *reducing node*: the place where a parameter gradient sums its per-sample parts, which the
per-sample rules rewrite.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import torch
import torch.fx as fx

import passes.rnn  # noqa: F401  (defines the dpcompile::rnn_scan ops ruled on below)
from passes.capture import Capture, node_module
from passes.errors import (
    BatchDimensionError,
    OutputError,
    SampleMixingError,
    UnsupportedOpError,
    describe,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class SampleDim:
    """Dimension ``dim`` holds samples: size ``outer * batch * inner``."""

    dim: int
    outer: int = 1
    inner: int = 1

    def moved(self, dim: int) -> SampleDim:
        return SampleDim(dim, self.outer, self.inner)


@dataclass(frozen=True)
class Mixed:
    """A value that depends on more than one sample through ``node``."""

    node: fx.Node
    reason: str
    fix: str

    def error(self) -> SampleMixingError:
        where = describe(node_module(self.node), self.node.target)
        return SampleMixingError(f"{where}: {self.reason}. {self.fix}")


Info = Union[SampleDim, Mixed, None, tuple]  # noqa: UP007 (a runtime alias on Python 3.10)
Rule = Callable[["Analysis", fx.Node], Info]

SAMPLE_RULES: dict[Any, Rule] = {}

BATCHNORM_FIX = (
    "Batch statistics make each sample's gradient depend on the whole batch, which DP-SGD "
    "cannot clip. Replace BatchNorm with GroupNorm (dpcompile.fix(model) does it) or "
    "LayerNorm, or freeze it with .eval()"
)
GENERIC_FIX = (
    "DP-SGD needs each sample's gradient to depend on that sample alone: compute this "
    "per sample (reduce over non-batch dimensions only)"
)


def register_sample_rule(*ops: Any) -> Callable[[Rule], Rule]:
    """Register a propagation rule for aten ops (overloads or overload packets)."""

    def wrap(rule: Rule) -> Rule:
        for op in ops:
            SAMPLE_RULES[op] = rule
        return rule

    return wrap


def _lookup(target: Any) -> Rule | None:
    rule = SAMPLE_RULES.get(target)
    if rule is None and isinstance(target, torch._ops.OpOverload):
        rule = SAMPLE_RULES.get(target.overloadpacket)
    return rule


@dataclass
class Analysis:
    """The result of the analysis: per-node sample structure and the reducing nodes."""

    capture: Capture
    batch_size: int
    info: dict[fx.Node, Info] = field(default_factory=dict)
    tangent: set[fx.Node] = field(default_factory=set)
    # (node, output index or None) -> the argument node that carried the samples away
    reducing: dict[tuple[fx.Node, int | None], fx.Node] = field(default_factory=dict)
    _current: fx.Node | None = None

    # ---- helpers for rules -------------------------------------------------------------
    def of(self, arg: Any) -> Info:
        return self.info.get(arg) if isinstance(arg, fx.Node) else None

    @staticmethod
    def shape(arg: Any) -> tuple[int, ...]:
        val = arg.meta.get("val") if isinstance(arg, fx.Node) else arg
        if isinstance(val, torch.Tensor):
            return tuple(int(s) for s in val.shape)
        raise BatchDimensionError(f"no static shape for {arg}")

    def is_tangent(self, node: fx.Node) -> bool:
        return node in self.tangent

    def mixed(self, reason: str, fix: str = GENERIC_FIX) -> Mixed:
        assert self._current is not None
        return Mixed(self._current, reason, fix)

    def reduce(self, carrier: fx.Node, index: int | None = None, reason: str = "") -> Info:
        """The current node sums ``carrier``'s samples: a reducing node in the backward."""
        node = self._current
        assert node is not None
        if not isinstance(self.info.get(carrier), SampleDim):
            return None  # nothing to sum over: the samples were summed upstream
        if node in self.tangent and carrier in self.tangent:
            self.reducing[(node, index)] = carrier
            return None
        return self.mixed(reason or "reduces over the batch dimension")

    def tangent_of(self, x: fx.Node, y: fx.Node) -> fx.Node:
        """Of two operands, the one that carries the backward signal."""
        return x if x in self.tangent else y

    def sample_size(self, sd: SampleDim) -> int:
        return sd.outer * self.batch_size * sd.inner

    # ---- driver ------------------------------------------------------------------------
    def run_node(self, node: fx.Node) -> Info:
        if node.op == "get_attr":
            return None
        if node.op != "call_function":
            raise UnsupportedOpError(f"unexpected graph node {node.op} {node.target}")
        inputs = node.all_input_nodes
        for arg in inputs:
            value = self.info.get(arg)
            if isinstance(value, Mixed):
                return value
            if isinstance(value, tuple) and node.target is not operator.getitem:
                continue
        if node.target is operator.getitem:
            source = self.info.get(node.args[0])
            if isinstance(source, tuple):
                return source[node.args[1]]
            return source
        carried = [arg for arg in inputs if isinstance(self.info.get(arg), SampleDim)]
        rule = _lookup(node.target)
        if rule is None:
            if isinstance(node.target, torch._ops.OpOverload) and (
                torch.Tag.pointwise in node.target.tags
            ):
                rule = pointwise
            elif not carried:
                return None  # touches no batch data: safe whatever it is
            else:
                raise UnsupportedOpError(
                    f"{describe(node_module(node), node.target)}: dpcompile has no sample-"
                    "dimension rule for this op, so it cannot prove the op keeps samples "
                    "independent. Register one with passes.register_sample_rule, or express "
                    "the layer with standard ops"
                )
        self._current = node
        try:
            return rule(self, node)
        finally:
            self._current = None


def analyze(capture: Capture) -> Analysis:
    """Annotate every node with its sample structure; raise if samples are mixed where it matters."""
    gm = capture.graph_module
    a = Analysis(capture=capture, batch_size=capture.batch_size)
    placeholders = capture.placeholders()
    seeds = set(capture.seed_placeholders())
    for node, dim in zip(capture.batch_placeholders(), capture.batch_dims):
        a.info[node] = SampleDim(dim)
    a.tangent.update(seeds)
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node.op == "output":
            continue
        if any(arg in a.tangent for arg in node.all_input_nodes):
            a.tangent.add(node)
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = list(output_node.args[0])
    num_leaves = len(capture.output_is_differentiable)
    leaf_nodes = outputs[:num_leaves]

    # Forward first: the seeds take their structure from the outputs they belong to.
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node in a.tangent:
            continue
        a.info[node] = a.run_node(node)
    seed_iter = iter(capture.seed_placeholders())
    for k, (leaf, differentiable) in enumerate(zip(leaf_nodes, capture.output_is_differentiable)):
        value = a.of(leaf)
        if isinstance(value, Mixed):
            raise value.error()
        if not differentiable:
            continue
        seed = next(seed_iter)
        if value is None:
            # An output that does not depend on the batch: its gradient is not per sample.
            if _depends_on_params(leaf, placeholders[: len(capture.trainable)]):
                raise OutputError(
                    f"output {k} of the model has no batch dimension (shape "
                    f"{tuple(a.shape(leaf)) if isinstance(leaf, fx.Node) else ()}): its gradient "
                    "cannot be split into per-sample parts. Return per-sample outputs (one row "
                    "per sample) and reduce over the batch in the loss"
                )
            a.info[seed] = None
            continue
        if capture.loss_mode and value != SampleDim(0):
            raise OutputError(
                "the loss does not keep one value per sample along dimension 0 "
                f"(found sample structure {value}); return per-sample losses"
            )
        a.info[seed] = value
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node not in a.tangent:
            continue
        a.info[node] = a.run_node(node)

    # Parameter gradients must not be mixed, and reducing nodes must feed only gradients.
    grads = outputs[num_leaves:]
    for param_index, grad in zip(capture.grad_for, grads):
        value = a.of(grad)
        if isinstance(value, Mixed):
            raise value.error()
        if isinstance(value, SampleDim):
            raise SampleMixingError(
                f"the gradient of parameter `{capture.trainable[param_index]}` still has a batch "
                "dimension; the graph is not a sum of per-sample gradients"
            )
    _check_reductions_feed_only_gradients(a, set(grads))
    return a


def _depends_on_params(node: Any, params: Sequence[fx.Node]) -> bool:
    if not isinstance(node, fx.Node):
        return False
    targets, seen, stack = set(params), set(), [node]
    while stack:
        n = stack.pop()
        if n in targets:
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _check_reductions_feed_only_gradients(a: Analysis, grads: set[fx.Node]) -> None:
    """A sum over samples in the backward may only flow into parameter gradients."""
    for (node, index), _ in a.reducing.items():
        starts = [node] if index is None else [
            u for u in node.users if u.target is operator.getitem and u.args[1] == index
        ]
        stack = list(starts)
        seen: set[fx.Node] = set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            for user in n.users:
                if user.op == "output":
                    continue
                value = a.info.get(user)
                if isinstance(value, SampleDim) or isinstance(value, tuple) and any(
                    isinstance(v, SampleDim) for v in value
                ):
                    culprit = Mixed(
                        node,
                        "sums gradients over the batch and feeds the result back into "
                        "per-sample values",
                        BATCHNORM_FIX if "batch_norm" in str(node.target) else GENERIC_FIX,
                    )
                    raise culprit.error()
                stack.append(user)


# ======================================================================================
# Rules
# ======================================================================================


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    out = []
    for arg in (*node.args, *node.kwargs.values()):
        if isinstance(arg, fx.Node):
            out.append(arg)
        elif isinstance(arg, (list, tuple)):
            out.extend(x for x in arg if isinstance(x, fx.Node))
    return out


def bound_args(node: fx.Node) -> dict[str, Any]:
    """The node's arguments by schema name, defaults filled in."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    for k, arg in enumerate(schema.arguments):
        if k < len(node.args):
            out[arg.name] = node.args[k]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _agree(a: Analysis, candidates: Iterable[Info]) -> Info:
    """All candidate structures must agree (None = no samples)."""
    result: Info = None
    for c in candidates:
        if c is None:
            continue
        if isinstance(c, Mixed):
            return c
        if result is None:
            result = c
        elif result != c:
            return a.mixed(
                f"combines values whose samples sit in different places ({result} vs {c})"
            )
    return result


def pointwise(a: Analysis, node: fx.Node) -> Info:
    """Elementwise with broadcasting: the sample dimension aligns from the right."""
    out_rank = len(a.shape(node))
    cands = []
    for arg in _tensor_args(node):
        sd = a.of(arg)
        if isinstance(sd, SampleDim):
            rank = len(a.shape(arg))
            cands.append(sd.moved(sd.dim + out_rank - rank))
    return _agree(a, cands)


def same_as_input(a: Analysis, node: fx.Node) -> Info:
    """Output has the shape of its first tensor input and is computed position by position."""
    return pointwise(a, node)


ELEMENTWISE_EXTRA = [
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar,
    aten._to_copy.default, aten.alias.default, aten.copy.default, aten.lift_fresh_copy.default,
    aten.detach.default, aten.clone.default, aten.contiguous.default,
    aten.hardtanh_backward.default, aten.leaky_relu_backward.default,
    aten.softplus_backward.default, aten.elu_backward.default, aten.mish_backward.default,
    aten.hardswish_backward.default, aten.hardsigmoid_backward.default,
    aten.log_sigmoid_backward.default, aten.rrelu_with_noise_backward.default,
    aten.threshold_backward.default, aten.gelu_backward.default, aten.silu_backward.default,
    aten.sigmoid_backward.default, aten.tanh_backward.default, aten.masked_fill.Scalar,
    aten.masked_fill.Tensor, aten.fill.Tensor, aten.native_dropout_backward.default,
    aten.logit_backward.default, aten.mse_loss_backward.default,
]
for _op in ELEMENTWISE_EXTRA:
    SAMPLE_RULES[_op] = pointwise


@register_sample_rule(aten._prelu_kernel.default)
def prelu(a: Analysis, node: fx.Node) -> Info:
    x, w = node.args[0], node.args[1]
    if isinstance(a.of(w), SampleDim):
        return a.mixed("uses per-sample PReLU weights")
    return a.of(x)


@register_sample_rule(aten._prelu_kernel_backward.default)
def prelu_backward(a: Analysis, node: fx.Node) -> Info:
    grad, x, w = node.args[:3]
    sd = _agree(a, [a.of(grad), a.of(x)])
    if not isinstance(sd, SampleDim):
        return (sd, None)
    return (sd, a.reduce(grad, 1))


@register_sample_rule(aten.log_sigmoid_forward.default)
def log_sigmoid_forward(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    return (sd, sd)


def _constant(a: Analysis, node: fx.Node) -> Info:
    return None


for _op in [
    aten.full.default, aten.zeros.default, aten.ones.default, aten.empty.memory_format,
    aten.empty_strided.default, aten.empty_permuted.default, aten.arange.default,
    aten.arange.start, aten.arange.start_step, aten.scalar_tensor.default,
    aten.full_like.default, aten.zeros_like.default, aten.ones_like.default,
    aten.empty_like.default, aten.new_zeros.default, aten.new_ones.default,
    aten.new_full.default, aten.new_empty.default, aten.new_empty_strided.default,
    aten.eye.default, aten.linspace.default, aten.rand.default, aten.randn.default,
    aten.randint.default, aten.randint.low, aten.rand_like.default, aten.randn_like.default,
    aten.randint_like.default, aten.bernoulli.p, aten.bernoulli.default, aten.bernoulli.Tensor,
    aten.fill.Scalar, aten.zero.default, aten.normal.Tensor_float, aten.uniform.default,
    aten._assert_async.msg, aten._assert_tensor_metadata.default,
]:
    SAMPLE_RULES[_op] = _constant


@register_sample_rule(aten.native_dropout.default)
def native_dropout(a: Analysis, node: fx.Node) -> Info:
    return (a.of(node.args[0]), None)


# ---- views ------------------------------------------------------------------------------


def regroup(a: Analysis, sd: SampleDim, in_shape: Sequence[int], out_shape: Sequence[int]) -> Info:
    """Where the sample axis lands after a reshape from ``in_shape`` to ``out_shape``.

    In the row-major flat index the sample axis has stride ``inner * prod(in_shape[dim+1:])``
    and extent ``batch``; it stays whole if some output dimension spans it.
    """
    stride = sd.inner * math.prod(in_shape[sd.dim + 1 :])
    block = stride * a.batch_size
    suffix = [math.prod(out_shape[k:]) for k in range(len(out_shape) + 1)]
    for d in range(len(out_shape)):
        if stride % suffix[d + 1] == 0 and suffix[d] % block == 0:
            return SampleDim(d, suffix[d] // block, stride // suffix[d + 1])
    return a.mixed(
        f"reshapes {tuple(in_shape)} to {tuple(out_shape)}, splitting the batch dimension "
        "across several dimensions",
        "Keep the batch dimension whole in reshapes (e.g. x.view(x.shape[0], -1))",
    )


@register_sample_rule(
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
    aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default, aten.view_copy.default,
    aten.flatten.using_ints, aten.unflatten.int,
)
def view(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    return regroup(a, sd, a.shape(node.args[0]), a.shape(node))


@register_sample_rule(aten.permute.default, aten.permute_copy.default)
def permute(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    dims = [_norm_dim(d, rank) for d in node.args[1]]
    return sd.moved(dims.index(sd.dim))


@register_sample_rule(aten.transpose.int, aten.t.default)
def transpose(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    if node.target is aten.t.default:
        d0, d1 = 0, rank - 1
    else:
        d0, d1 = (_norm_dim(d, rank) for d in node.args[1:3])
    if sd.dim == d0:
        return sd.moved(d1)
    if sd.dim == d1:
        return sd.moved(d0)
    return sd


@register_sample_rule(aten.expand.default, aten.expand_copy.default)
def expand(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    return sd.moved(sd.dim + len(a.shape(node)) - len(a.shape(node.args[0])))


def _slice_info(a: Analysis, sd: SampleDim, size: int, start: int, end: int, step: int) -> Info:
    block = a.batch_size * sd.inner
    if start == 0 and end >= size and step == 1:
        return sd
    if step == 1 and start % block == 0 and end % block == 0 and end > start:
        return SampleDim(sd.dim, (end - start) // block, sd.inner)
    return a.mixed("takes a slice of the batch dimension (a subset of the samples)")


@register_sample_rule(aten.slice.Tensor, aten.slice_copy.Tensor)
def slice_(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    args = bound_args(node)
    rank = len(a.shape(node.args[0]))
    dim = _norm_dim(args["dim"], rank)
    if dim != sd.dim:
        return sd
    size = a.shape(node.args[0])[dim]
    start = args["start"] if args["start"] is not None else 0
    end = args["end"] if args["end"] is not None else size
    start = max(start + size, 0) if start < 0 else min(start, size)
    end = max(end + size, 0) if end < 0 else min(end, size)
    return _slice_info(a, sd, size, start, end, args["step"])


@register_sample_rule(aten.select.int, aten.select_copy.int)
def select(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    dim = _norm_dim(node.args[1], rank)
    if dim == sd.dim:
        return a.mixed("selects a single position of the batch dimension")
    return sd.moved(sd.dim - 1) if dim < sd.dim else sd


@register_sample_rule(aten.split_with_sizes.default, aten.split.Tensor, aten.split.sizes)
def split(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    shapes = [tuple(v.shape) for v in node.meta["val"]]
    if not isinstance(sd, SampleDim):
        return tuple(sd for _ in shapes)
    rank = len(a.shape(node.args[0]))
    dim = _norm_dim(node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0), rank)
    if dim != sd.dim:
        return tuple(sd for _ in shapes)
    size = a.shape(node.args[0])[dim]
    out, start = [], 0
    for shape in shapes:
        out.append(_slice_info(a, sd, size, start, start + shape[dim], 1))
        start += shape[dim]
    return tuple(out)


@register_sample_rule(aten.unbind.int)
def unbind(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    n = len(node.meta["val"])
    if not isinstance(sd, SampleDim):
        return tuple(sd for _ in range(n))
    rank = len(a.shape(node.args[0]))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else 0, rank)
    if dim == sd.dim:
        return a.mixed("unbinds the batch dimension into separate samples")
    moved = sd.moved(sd.dim - 1) if dim < sd.dim else sd
    return tuple(moved for _ in range(n))


@register_sample_rule(aten.cat.default)
def cat(a: Analysis, node: fx.Node) -> Info:
    tensors = [t for t in node.args[0] if isinstance(t, fx.Node)]
    tensors = [t for t in tensors if math.prod(a.shape(t)) > 0 or len(a.shape(t)) > 1]
    rank = len(a.shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    infos = [a.of(t) for t in tensors]
    carried = [i for i in infos if isinstance(i, SampleDim)]
    if not carried:
        return None
    if any(i.dim != carried[0].dim or i.inner != carried[0].inner for i in carried):
        return a.mixed("concatenates values whose samples sit in different places")
    if carried[0].dim != dim:
        return _agree(a, infos)
    if len(carried) != len(infos):
        return a.mixed("concatenates data without samples into the batch dimension")
    return SampleDim(dim, sum(i.outer for i in carried), carried[0].inner)


@register_sample_rule(aten.stack.default)
def stack(a: Analysis, node: fx.Node) -> Info:
    tensors = list(node.args[0])
    rank = len(a.shape(node))
    dim = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), rank)
    cands = []
    for t in tensors:
        sd = a.of(t)
        if isinstance(sd, SampleDim):
            cands.append(sd.moved(sd.dim + 1) if sd.dim >= dim else sd)
    return _agree(a, cands)


@register_sample_rule(aten.slice_scatter.default, aten.select_scatter.default)
def slice_scatter(a: Analysis, node: fx.Node) -> Info:
    base, src = node.args[0], node.args[1]
    base_sd, src_sd = a.of(base), a.of(src)
    rank = len(a.shape(base))
    args = bound_args(node)
    dim = _norm_dim(args["dim"], rank)
    if node.target is aten.select_scatter.default and isinstance(src_sd, SampleDim):
        src_sd = src_sd.moved(src_sd.dim + 1) if src_sd.dim >= dim else src_sd
    for sd in (base_sd, src_sd):
        if isinstance(sd, SampleDim) and sd.dim == dim:
            if node.target is aten.slice_scatter.default and src_sd == base_sd:
                size = a.shape(base)[dim]
                start = args["start"] or 0
                end = args["end"] if args["end"] is not None else size
                if start == 0 and end >= size:
                    return sd
            return a.mixed("writes into a slice of the batch dimension")
    return _agree(a, [base_sd, src_sd])


@register_sample_rule(aten.constant_pad_nd.default)
def constant_pad(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    pad = list(node.args[1])
    for k in range(len(pad) // 2):
        dim = rank - 1 - k
        if dim == sd.dim and (pad[2 * k] != 0 or pad[2 * k + 1] != 0):
            return a.mixed("pads the batch dimension")
    return sd


@register_sample_rule(aten.repeat.default)
def repeat(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    repeats = list(node.args[1])
    rank = len(a.shape(node.args[0]))
    dim = sd.dim + len(repeats) - rank
    return SampleDim(dim, sd.outer * repeats[dim], sd.inner)


@register_sample_rule(aten.flip.default)
def flip(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    if sd.dim in [_norm_dim(d, rank) for d in node.args[1]]:
        return a.mixed("reverses the batch dimension")
    return sd


@register_sample_rule(aten.roll.default)
def roll(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    dims = bound_args(node)["dims"]
    if not dims or sd.dim in [_norm_dim(d, rank) for d in dims]:
        return a.mixed("rolls values across the batch dimension")
    return sd


@register_sample_rule(aten.tril.default, aten.triu.default, aten.diagonal.default)
def last_two_dims(a: Analysis, node: fx.Node) -> Info:
    sd = a.of(node.args[0])
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(node.args[0]))
    if sd.dim >= rank - 2:
        return a.mixed("treats the batch dimension as a matrix dimension")
    return sd


# ---- reductions -------------------------------------------------------------------------


def _reduce_dims(a: Analysis, node: fx.Node, x: fx.Node, dims: Any, keepdim: bool) -> Info:
    sd = a.of(x)
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(x))
    if dims is None or (isinstance(dims, (list, tuple)) and len(dims) == 0):
        dims = list(range(rank))
    elif isinstance(dims, int):
        dims = [dims]
    dims = [_norm_dim(d, rank) for d in dims]
    if sd.dim in dims:
        return a.reduce(x, None)
    if keepdim:
        return sd
    return sd.moved(sd.dim - sum(1 for d in dims if d < sd.dim))


@register_sample_rule(
    aten.sum.dim_IntList, aten.mean.dim, aten.amax.default, aten.amin.default, aten.any.dim,
    aten.any.dims, aten.all.dim, aten.all.dims, aten.prod.dim_int, aten.logsumexp.default,
    aten.argmax.default, aten.argmin.default, aten.var.correction, aten.std.correction,
    aten.linalg_vector_norm.default, aten.norm.ScalarOpt_dim, aten.sum.default,
    aten.mean.default, aten.any.default, aten.all.default, aten.prod.default,
    aten.max.default, aten.min.default, aten.var.dim, aten.std.dim,
)
def reduction(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    x = node.args[0]
    dims = args.get("dim")
    keepdim = bool(args.get("keepdim", False))
    return _reduce_dims(a, node, x, dims, keepdim)


@register_sample_rule(aten.var_mean.correction, aten.max.dim, aten.min.dim)
def reduction_pair(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    value = _reduce_dims(a, node, node.args[0], args.get("dim"), bool(args.get("keepdim")))
    return (value, value)


def _along_dim(a: Analysis, node: fx.Node, x: fx.Node, dim: int | None) -> Info:
    sd = a.of(x)
    if not isinstance(sd, SampleDim):
        return sd
    rank = len(a.shape(x))
    if dim is None or _norm_dim(dim, rank) == sd.dim:
        return a.mixed("normalizes or orders values along the batch dimension")
    return sd


@register_sample_rule(
    aten._softmax.default, aten._log_softmax.default, aten.cumsum.default,
    aten.cumprod.default, aten.logcumsumexp.default,
)
def along_dim(a: Analysis, node: fx.Node) -> Info:
    return _along_dim(a, node, node.args[0], node.args[1])


@register_sample_rule(aten._softmax_backward_data.default, aten._log_softmax_backward_data.default)
def softmax_backward(a: Analysis, node: fx.Node) -> Info:
    grad, out, dim = node.args[:3]
    sd = _agree(a, [a.of(grad), a.of(out)])
    if not isinstance(sd, SampleDim):
        return sd
    return _along_dim(a, node, grad, dim)


@register_sample_rule(aten.sort.default, aten.sort.stable, aten.cummax.default, aten.cummin.default)
def sort(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    value = _along_dim(a, node, node.args[0], args.get("dim", -1))
    return (value, value)


@register_sample_rule(aten.topk.default, aten.kthvalue.default)
def topk(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    value = _along_dim(a, node, node.args[0], args.get("dim", -1))
    if isinstance(value, SampleDim) and node.target is aten.kthvalue.default and not args.get(
        "keepdim"
    ):
        rank = len(a.shape(node.args[0]))
        dim = _norm_dim(args.get("dim", -1), rank)
        value = value.moved(value.dim - 1) if dim < value.dim else value
    return (value, value)


# ---- contractions -----------------------------------------------------------------------


def _matmul(a: Analysis, node: fx.Node, x: fx.Node, y: fx.Node, batch_dims: int) -> Info:
    """x (..., n, k) @ y (..., k, m) with ``batch_dims`` leading batch dimensions."""
    sx, sy = a.of(x), a.of(y)
    if not isinstance(sx, SampleDim) and not isinstance(sy, SampleDim):
        return None
    b = batch_dims
    if isinstance(sx, SampleDim) and isinstance(sy, SampleDim):
        if sx.dim < b and sx == sy:
            return sx
        if sx.dim == b + 1 and sy.dim == b and (sx.outer, sx.inner) == (sy.outer, sy.inner):
            return a.reduce(a.tangent_of(x, y), None)
        return a.mixed("multiplies values of different samples together")
    if isinstance(sx, SampleDim):
        if sx.dim < b:
            return sx
        if sx.dim == b:
            return sx  # rows of x are rows of the output
        return a.reduce(x, None)  # contraction over the sample axis
    assert isinstance(sy, SampleDim)
    if sy.dim < b:
        return sy
    if sy.dim == b + 1:
        return sy  # columns of y are columns of the output
    return a.reduce(y, None)


@register_sample_rule(aten.mm.default)
def mm(a: Analysis, node: fx.Node) -> Info:
    return _matmul(a, node, node.args[0], node.args[1], 0)


@register_sample_rule(aten.bmm.default)
def bmm(a: Analysis, node: fx.Node) -> Info:
    return _matmul(a, node, node.args[0], node.args[1], 1)


@register_sample_rule(aten.addmm.default, aten.baddbmm.default)
def addmm(a: Analysis, node: fx.Node) -> Info:
    batch = 1 if node.target is aten.baddbmm.default else 0
    product = _matmul(a, node, node.args[1], node.args[2], batch)
    if isinstance(product, Mixed):
        return product
    bias = a.of(node.args[0])
    if isinstance(bias, SampleDim):
        rank = len(a.shape(node))
        bias = bias.moved(bias.dim + rank - len(a.shape(node.args[0])))
    return _agree(a, [product, bias])


@register_sample_rule(aten.mv.default)
def mv(a: Analysis, node: fx.Node) -> Info:
    sx, sv = a.of(node.args[0]), a.of(node.args[1])
    if isinstance(sx, SampleDim) and sx.dim == 0 and sv is None:
        return sx
    if sx is None and sv is None:
        return None
    if isinstance(sx, SampleDim) and sx.dim == 1 and sv is None:
        return a.reduce(node.args[0], None)
    if sx is None and isinstance(sv, SampleDim):
        return a.reduce(node.args[1], None)
    return a.mixed("multiplies values of different samples together")


@register_sample_rule(aten.dot.default)
def dot(a: Analysis, node: fx.Node) -> Info:
    x, y = node.args[:2]
    carrier = x if isinstance(a.of(x), SampleDim) else y
    if isinstance(a.of(x), SampleDim) and isinstance(a.of(y), SampleDim) and a.of(x) != a.of(y):
        return a.mixed("multiplies values of different samples together")
    return a.reduce(a.tangent_of(x, y) if a.of(x) == a.of(y) else carrier, None)


# ---- batch-leading ops: dimension 0 is an independent batch -----------------------------


def _leading(a: Analysis, node: fx.Node, args: Sequence[Any]) -> Info:
    infos = [a.of(x) for x in args if isinstance(x, fx.Node)]
    sd = _agree(a, infos)
    if isinstance(sd, SampleDim) and sd.dim != 0:
        return a.mixed(
            f"treats dimension {sd.dim}, which holds samples, as a feature or spatial dimension",
            "Put the batch first (N, C, ...) for this op",
        )
    return sd


def batch_leading(a: Analysis, node: fx.Node) -> Info:
    sd = _leading(a, node, _tensor_args(node))
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        return tuple(sd if isinstance(v, torch.Tensor) and v.dim() > 0 else None for v in val)
    return sd


for _name in [
    "max_pool2d_with_indices", "max_pool3d_with_indices", "max_pool2d_with_indices_backward",
    "max_pool3d_with_indices_backward", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "avg_pool2d_backward", "avg_pool3d_backward", "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d", "_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d_backward", "upsample_nearest1d", "upsample_nearest2d",
    "upsample_nearest3d", "upsample_nearest1d_backward", "upsample_nearest2d_backward",
    "upsample_nearest3d_backward", "upsample_bilinear2d", "upsample_bilinear2d_backward",
    "upsample_linear1d", "upsample_linear1d_backward", "upsample_bicubic2d",
    "upsample_bicubic2d_backward", "upsample_trilinear3d", "upsample_trilinear3d_backward",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "_upsample_bilinear2d_aa", "grid_sampler_2d", "grid_sampler_2d_backward",
    "grid_sampler_3d", "grid_sampler_3d_backward", "pixel_shuffle", "pixel_unshuffle",
    "im2col", "col2im", "reflection_pad1d", "reflection_pad2d", "reflection_pad3d",
    "replication_pad1d", "replication_pad2d", "replication_pad3d",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "replication_pad1d_backward", "replication_pad2d_backward", "replication_pad3d_backward",
    "max_unpool2d", "max_unpool3d", "channel_shuffle", "native_channel_shuffle",
]:
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        SAMPLE_RULES[_packet] = batch_leading


@register_sample_rule(aten.convolution.default)
def convolution(a: Analysis, node: fx.Node) -> Info:
    x, weight, bias = node.args[:3]
    if isinstance(a.of(weight), SampleDim) or isinstance(a.of(bias), SampleDim):
        return a.mixed("convolves with per-sample weights")
    return _leading(a, node, [x])


@register_sample_rule(aten.convolution_backward.default)
def convolution_backward(a: Analysis, node: fx.Node) -> Info:
    grad, x, weight = node.args[:3]
    if isinstance(a.of(weight), SampleDim):
        return a.mixed("convolves with per-sample weights")
    sd = _leading(a, node, [grad, x])
    if not isinstance(sd, SampleDim):
        return (sd, sd, sd)
    mask = bound_args(node)["output_mask"]
    grad_weight = a.reduce(grad, 1) if mask[1] else None
    grad_bias = a.reduce(grad, 2) if mask[2] else None
    return (sd, grad_weight, grad_bias)


# ---- normalization ----------------------------------------------------------------------


@register_sample_rule(aten.native_layer_norm.default)
def layer_norm(a: Analysis, node: fx.Node) -> Info:
    x, normalized_shape = node.args[:2]
    sd = a.of(x)
    for p in node.args[2:4]:
        if isinstance(a.of(p), SampleDim):
            return a.mixed("uses per-sample normalization weights")
    if not isinstance(sd, SampleDim):
        return (sd, sd, sd)
    rank = len(a.shape(x))
    if sd.dim >= rank - len(normalized_shape):
        return a.mixed(
            "normalizes over the batch dimension",
            "Normalize over feature dimensions only (normalized_shape must not include the batch)",
        )
    return (sd, sd, sd)


@register_sample_rule(aten.native_layer_norm_backward.default)
def layer_norm_backward(a: Analysis, node: fx.Node) -> Info:
    grad, x, normalized_shape = node.args[:3]
    sd = _agree(a, [a.of(grad), a.of(x)])
    if not isinstance(sd, SampleDim):
        return (sd, None, None)
    if sd.dim >= len(a.shape(x)) - len(normalized_shape):
        return a.mixed("normalizes over the batch dimension")
    mask = bound_args(node)["output_mask"]
    return (sd, a.reduce(grad, 1) if mask[1] else None, a.reduce(grad, 2) if mask[2] else None)


@register_sample_rule(aten.native_group_norm.default)
def group_norm(a: Analysis, node: fx.Node) -> Info:
    sd = _leading(a, node, [node.args[0]])
    for p in node.args[1:3]:
        if isinstance(a.of(p), SampleDim):
            return a.mixed("uses per-sample normalization weights")
    return (sd, sd, sd)


@register_sample_rule(aten.native_group_norm_backward.default)
def group_norm_backward(a: Analysis, node: fx.Node) -> Info:
    grad, x = node.args[:2]
    sd = _leading(a, node, [grad, x])
    if not isinstance(sd, SampleDim):
        return (sd, None, None)
    mask = bound_args(node)["output_mask"]
    return (sd, a.reduce(grad, 1) if mask[1] else None, a.reduce(grad, 2) if mask[2] else None)


def _batch_norm(a: Analysis, node: fx.Node, training: bool, n_outputs: int) -> Info:
    x = node.args[0]
    sd = a.of(x)
    for p in node.args[1:5]:
        if isinstance(a.of(p), SampleDim):
            return a.mixed("uses per-sample normalization parameters")
    if not isinstance(sd, SampleDim):
        return tuple(sd for _ in range(n_outputs))
    if not training:
        return (sd,) + (None,) * (n_outputs - 1)
    if sd.dim != 1:
        return a.mixed("computes batch statistics (BatchNorm in training mode)", BATCHNORM_FIX)
    # Statistics per channel where channels carry the samples (instance norm): per sample.
    stats = SampleDim(0, sd.outer, sd.inner)
    outs: list[Info] = [sd, stats, stats]
    if n_outputs == 5:
        return a.mixed(
            "updates running statistics from every sample of the batch",
            "Set track_running_stats=False (InstanceNorm) or use GroupNorm",
        )
    return tuple(outs)


@register_sample_rule(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def native_batch_norm(a: Analysis, node: fx.Node) -> Info:
    return _batch_norm(a, node, bool(bound_args(node)["training"]), 3)


@register_sample_rule(aten._native_batch_norm_legit.no_stats)
def native_batch_norm_no_stats(a: Analysis, node: fx.Node) -> Info:
    return _batch_norm(a, node, bool(bound_args(node)["training"]), 3)


@register_sample_rule(aten._native_batch_norm_legit_functional.default)
def native_batch_norm_functional(a: Analysis, node: fx.Node) -> Info:
    training = bool(bound_args(node)["training"])
    if not training:
        return (a.of(node.args[0]), None, None, None, None)
    return _batch_norm(a, node, True, 5)


@register_sample_rule(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm_eval(a: Analysis, node: fx.Node) -> Info:
    return _batch_norm(a, node, False, 3)


@register_sample_rule(aten.native_batch_norm_backward.default)
def native_batch_norm_backward(a: Analysis, node: fx.Node) -> Info:
    grad, x = node.args[:2]
    sd = _agree(a, [a.of(grad), a.of(x)])
    if not isinstance(sd, SampleDim):
        return (sd, None, None)
    if bound_args(node)["train"] and sd.dim != 1:
        return a.mixed("computes batch statistics (BatchNorm in training mode)", BATCHNORM_FIX)
    mask = bound_args(node)["output_mask"]
    if sd.dim == 0 or sd.dim == 1:
        gw = a.reduce(grad, 1) if mask[1] and sd.dim == 0 else None
        gb = a.reduce(grad, 2) if mask[2] and sd.dim == 0 else None
        if sd.dim == 1:
            stats = SampleDim(0, sd.outer, sd.inner)
            return (sd, stats if mask[1] else None, stats if mask[2] else None)
        return (sd, gw, gb)
    return a.mixed("normalizes with batch-wide parameters in an unexpected layout")


# ---- embeddings -------------------------------------------------------------------------


@register_sample_rule(aten.embedding.default)
def embedding(a: Analysis, node: fx.Node) -> Info:
    weight, indices = node.args[:2]
    if isinstance(a.of(weight), SampleDim):
        return a.mixed("looks up per-sample embedding tables")
    return a.of(indices)


@register_sample_rule(aten.embedding_dense_backward.default)
def embedding_backward(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    if args["scale_grad_by_freq"]:
        return a.mixed(
            "scales gradients by how often each index occurs in the whole batch "
            "(scale_grad_by_freq=True)",
            "Use scale_grad_by_freq=False",
        )
    return a.reduce(node.args[0], None)


def _regular_offsets(a: Analysis, offsets: Any, indices_sd: SampleDim, n: int) -> bool:
    """Offsets that start one bag every ``inner`` indices: bags are (parts of) samples."""
    if not isinstance(offsets, fx.Node) or offsets.target is not aten.arange.start_step:
        return False
    start, end, step = (list(offsets.args) + [1])[:3]
    return start == 0 and end >= n and indices_sd.inner % step == 0


@register_sample_rule(aten._embedding_bag.default, aten._embedding_bag_forward_only.default)
def embedding_bag(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    weight, indices, offsets = args["weight"], args["indices"], args["offsets"]
    if isinstance(a.of(weight), SampleDim):
        return a.mixed("looks up per-sample embedding tables")
    sd = a.of(indices)
    psw = a.of(args["per_sample_weights"])
    if isinstance(sd, SampleDim) and psw is not None and psw != sd:
        return a.mixed("weights bag entries with values of other samples")
    if not isinstance(sd, SampleDim):
        return (None, None, None, None)
    n = a.shape(indices)[0]
    if sd.dim != 0 or not _regular_offsets(a, offsets, sd, n):
        return a.mixed(
            "takes bags from a flat index tensor with explicit offsets; dpcompile cannot tell "
            "which bag belongs to which sample",
            "Pass a 2-D (batch, bag_size) index tensor to EmbeddingBag (pad with padding_idx)",
        )
    step = (list(offsets.args) + [1])[2]
    bags_per_sample = sd.inner // step
    bag_sd = SampleDim(0, sd.outer, bags_per_sample)
    return (bag_sd, sd, bag_sd, bag_sd)


@register_sample_rule(aten._embedding_bag_backward.default, aten._embedding_bag_dense_backward.default)
def embedding_bag_backward(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    if args["scale_grad_by_freq"]:
        return a.mixed(
            "scales gradients by how often each index occurs in the whole batch",
            "Use scale_grad_by_freq=False",
        )
    return a.reduce(args["grad"], None)


# ---- attention --------------------------------------------------------------------------


def attention(a: Analysis, node: fx.Node) -> Info:
    infos = []
    for arg in _tensor_args(node):
        sd = a.of(arg)
        if isinstance(sd, SampleDim):
            rank = len(a.shape(arg))
            if sd.dim >= rank - 2:
                return a.mixed("attends across the batch dimension")
            infos.append(sd)
    sd = _agree(a, infos)
    val = node.meta.get("val")
    if not isinstance(val, (tuple, list)):
        return sd
    out = []
    for v in val:
        keep = (
            isinstance(sd, SampleDim)
            and isinstance(v, torch.Tensor)
            and v.dim() > sd.dim
            and v.shape[sd.dim] == a.sample_size(sd)
        )
        out.append(sd if keep else None)
    return tuple(out)


for _name in [
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention_for_cpu_backward",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward",
    "_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward",
    "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_cudnn_attention_backward",
    "_efficient_attention_forward", "_efficient_attention_backward", "_flash_attention_forward",
    "_flash_attention_backward", "_scaled_dot_product_attention_math",
]:
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        SAMPLE_RULES[_packet] = attention


# ---- indexing ---------------------------------------------------------------------------


@register_sample_rule(aten.index_select.default)
def index_select(a: Analysis, node: fx.Node) -> Info:
    x, dim, index = node.args[:3]
    sd = a.of(x)
    if isinstance(a.of(index), SampleDim):
        return a.mixed("selects with per-sample indices along a shared dimension")
    if not isinstance(sd, SampleDim):
        return sd
    if _norm_dim(dim, len(a.shape(x))) == sd.dim:
        return a.mixed("selects positions of the batch dimension")
    return sd


@register_sample_rule(aten.gather.default)
def gather(a: Analysis, node: fx.Node) -> Info:
    x, dim, index = node.args[:3]
    sx, si = a.of(x), a.of(index)
    rank = len(a.shape(x))
    dim = _norm_dim(dim, rank)
    for sd in (sx, si):
        if isinstance(sd, SampleDim) and sd.dim == dim:
            return a.mixed("gathers along the batch dimension")
    if isinstance(sx, SampleDim) and si is None:
        if a.shape(index)[sx.dim] != a.shape(x)[sx.dim]:
            return a.mixed("gathers a subset of the samples")
    return _agree(a, [sx, si])


@register_sample_rule(
    aten.scatter.src, aten.scatter.value, aten.scatter_add.default, aten.scatter.reduce,
    aten.scatter.value_reduce, aten.scatter_reduce.two,
)
def scatter(a: Analysis, node: fx.Node) -> Info:
    x, dim, index = node.args[:3]
    src = node.args[3] if len(node.args) > 3 else None
    rank = len(a.shape(x))
    dim = _norm_dim(dim, rank)
    infos = [a.of(x), a.of(index), a.of(src)]
    for sd in infos:
        if isinstance(sd, SampleDim) and sd.dim == dim:
            return a.mixed("scatters along the batch dimension")
    return _agree(a, infos)


def _index_layout(rank: int, indexed: list[int], index_rank: int) -> Callable[[int], int]:
    """Position in the result of input dimension ``d`` (not indexed) under advanced indexing."""
    consecutive = indexed == list(range(indexed[0], indexed[-1] + 1))

    def where(d: int) -> int:
        if consecutive:
            if d < indexed[0]:
                return d
            return d - len(indexed) + index_rank
        rest = [k for k in range(rank) if k not in indexed]
        return index_rank + rest.index(d)

    return where


_ARANGE_VIEWS = {
    aten.view.default, aten.unsqueeze.default, aten.expand.default, aten.clone.default,
    aten._to_copy.default, aten.alias.default, aten.reshape.default,
}


def _batch_arange(a: Analysis, t: Any) -> int | None:
    """If ``t`` is ``arange(B)`` (possibly reshaped or expanded), the dimension holding it."""
    node = t
    while isinstance(node, fx.Node) and node.target in _ARANGE_VIEWS:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.target not in (
        aten.arange.default, aten.arange.start, aten.arange.start_step,
    ):
        return None
    args = [x for x in node.args if not isinstance(x, fx.Node)]
    if node.target is aten.arange.default:
        start, end, step = 0, args[0], 1
    else:
        start, end, step = (list(args) + [1])[:3]
    if (start, end, step) != (0, a.batch_size, 1):
        return None
    sizes = [k for k, size in enumerate(a.shape(t)) if size == a.batch_size]
    return sizes[0] if len(sizes) == 1 else None


def _index_infos(a: Analysis, x: fx.Node, indices: Sequence[Any]) -> list[Info] | Mixed:
    """Sample structure of each index tensor; ``arange(B)`` at the batch dimension of ``x``
    selects every sample's own row (``logp[torch.arange(B), y]``) and carries the samples."""
    sx = a.of(x)
    infos: list[Info] = []
    for k, t in enumerate(indices):
        info = a.of(t) if t is not None else None
        if t is not None and isinstance(sx, SampleDim) and k == sx.dim:
            dim = _batch_arange(a, t)
            if dim is None or (sx.outer, sx.inner) != (1, 1):
                return a.mixed("indexes the batch dimension with an index tensor")
            info = SampleDim(dim)
        infos.append(info)
    return infos


@register_sample_rule(aten.index.Tensor, aten._unsafe_index.Tensor)
def index(a: Analysis, node: fx.Node) -> Info:
    x, indices = node.args[:2]
    rank = len(a.shape(x))
    indexed = [k for k, t in enumerate(indices) if t is not None]
    index_rank = len(a.shape(node)) - (rank - len(indexed))
    where = _index_layout(rank, indexed, index_rank)
    infos = _index_infos(a, x, indices)
    if isinstance(infos, Mixed):
        return infos
    cands: list[Info] = []
    sx = a.of(x)
    if isinstance(sx, SampleDim) and sx.dim not in indexed:
        cands.append(sx.moved(where(sx.dim)))
    offset = indexed[0] if indexed == list(range(indexed[0], indexed[-1] + 1)) else 0
    for t, st in zip(indices, infos):
        if isinstance(st, SampleDim):
            cands.append(st.moved(st.dim + index_rank - len(a.shape(t)) + offset))
    return _agree(a, cands)


@register_sample_rule(aten.index_put.default, aten._unsafe_index_put.default)
def index_put(a: Analysis, node: fx.Node) -> Info:
    x, indices, values = node.args[:3]
    rank = len(a.shape(x))
    indexed = [k for k, t in enumerate(indices) if t is not None]
    aranged = [k for k, t in enumerate(indices) if t is not None and _batch_arange(a, t) is not None
               and a.shape(x)[k] == a.batch_size]
    if aranged and a.of(x) in (None, SampleDim(aranged[0])):
        # Writing every sample's values back into its own row (the backward of x[arange(B), y]).
        if a.of(values) is not None or a.of(x) is not None:
            return SampleDim(aranged[0])
    if any(isinstance(a.of(t), SampleDim) for t in indices if t is not None):
        sx = a.of(x)
        sv = a.of(values)
        if sx is None and isinstance(sv, SampleDim):
            return a.reduce(values, None)
        return a.mixed("writes with per-sample indices")
    sx = a.of(x)
    if isinstance(sx, SampleDim) and sx.dim in indexed:
        return a.mixed("writes into positions of the batch dimension")
    sv = a.of(values)
    if isinstance(sv, SampleDim):
        index_rank = len(a.shape(node)) - (rank - len(indexed))
        where = _index_layout(rank, indexed, index_rank)
        full_rank = index_rank + rank - len(indexed)
        vdim = sv.dim + full_rank - len(a.shape(values))
        back = [d for d in range(rank) if d not in indexed and where(d) == vdim]
        if not back:
            return a.mixed("writes per-sample values into a shared tensor")
        sv = sv.moved(back[0])
    return _agree(a, [sx, sv])


@register_sample_rule(aten.index_add.default, aten.index_copy.default, aten.index_fill.int_Scalar)
def index_add(a: Analysis, node: fx.Node) -> Info:
    x, dim, index = node.args[:3]
    src = node.args[3] if len(node.args) > 3 else None
    rank = len(a.shape(x))
    dim = _norm_dim(dim, rank)
    if isinstance(a.of(index), SampleDim):
        return a.mixed("adds with per-sample indices")
    infos = [a.of(x), a.of(src)]
    for sd in infos:
        if isinstance(sd, SampleDim) and sd.dim == dim:
            return a.mixed("adds along the batch dimension")
    return _agree(a, infos)


# ---- losses -----------------------------------------------------------------------------


def _loss(a: Analysis, node: fx.Node) -> Info:
    args = bound_args(node)
    infos = [a.of(x) for x in _tensor_args(node)]
    sd = _agree(a, infos)
    if not isinstance(sd, SampleDim):
        return (sd, None) if isinstance(node.meta.get("val"), (tuple, list)) else sd
    reduction = args.get("reduction", 1)
    if reduction != 0:
        value = a.mixed(
            "reduces the loss over the batch inside the graph",
            "Return per-sample losses (reduction='none')",
        )
        return (value, None) if isinstance(node.meta.get("val"), (tuple, list)) else value
    if sd.dim != 0:
        return a.mixed("computes a loss with the batch in an unexpected dimension")
    return (sd, None) if isinstance(node.meta.get("val"), (tuple, list)) else sd


for _name in [
    "nll_loss_forward", "nll_loss2d_forward", "nll_loss_backward", "nll_loss2d_backward",
    "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "binary_cross_entropy",
    "binary_cross_entropy_backward", "binary_cross_entropy_with_logits", "soft_margin_loss",
    "kl_div", "smooth_l1_loss_backward", "huber_loss_backward", "soft_margin_loss_backward",
]:
    _packet = getattr(aten, _name, None)
    if _packet is not None:
        SAMPLE_RULES[_packet] = _loss
SAMPLE_RULES[aten.mse_loss_backward.default] = _loss


@register_sample_rule(aten._local_scalar_dense.default, aten.item.default)
def scalar(a: Analysis, node: fx.Node) -> Info:
    if isinstance(a.of(node.args[0]), SampleDim):
        return a.mixed("reads a value of the batch into Python (.item())")
    return None


# The recurrence ops of passes/rnn.py treat each sample on its own: sequences are time-major
# (T, B, ·), states (B, ·).


def _recurrence(a: Analysis, node: fx.Node, sequences: tuple[int, ...], states: tuple[int, ...],
                outputs: tuple[str, ...]) -> Info:
    expected = [(k, SampleDim(1)) for k in sequences] + [(k, SampleDim(0)) for k in states]
    for k, sd in expected:
        got = a.of(node.args[k])
        if got is not None and got != sd:
            return a.mixed(f"runs a recurrence over a layout it was not built for ({got})")
    out: list[Info] = []
    for kind, val in zip(outputs, node.meta["val"]):
        if val.numel() == 0:
            out.append(None)
        else:
            out.append(SampleDim(1) if kind == "sequence" else SampleDim(0))
    return tuple(out)


@register_sample_rule(torch.ops.dpcompile.rnn_scan.default)
def rnn_scan(a: Analysis, node: fx.Node) -> Info:
    return _recurrence(a, node, (0,), (1, 2), ("sequence", "state", "state", "sequence", "sequence"))


@register_sample_rule(torch.ops.dpcompile.rnn_scan_backward.default)
def rnn_scan_backward(a: Analysis, node: fx.Node) -> Info:
    return _recurrence(a, node, (0, 3, 4, 7), (1, 2, 5, 6), ("sequence", "sequence", "state", "state"))
