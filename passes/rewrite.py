"""rewrite: turn the joint graph's summed parameter gradients into per-sample norms and clipped sums.

Given a capture and its analysis, :func:`private_backward` returns a graph

    (*trainable, *frozen, *buffers, *batch, *seeds, mask, max_grad_norm)
        -> (*outputs, per_sample_norms, *clipped_grads)

that computes, in one backward pass, every sample's gradient norm and the sum of the per-sample
gradients each scaled by ``c_b = mask_b · min(1, C / (‖g_b‖ + 1e-6))`` (Book-Keeping: the weight
gradients are computed once, with each reducing node's backward signal scaled by ``c``). With
``clipping="per_layer"``, ``max_grad_norm`` holds one C per trainable parameter with a gradient,
norms are ``(B, P)`` and every parameter is clipped on its own.

``nonfinite="drop"``: a sample whose gradient has a NaN or Inf gets ``c_b = 0``, and every
per-sample value the clipped sums read is zeroed for it first (``torch.where``, not a product,
so ``0·Inf = NaN`` cannot reach the sum): it contributes exactly nothing. Its norm is still
returned (non-finite) so that the runtime can count it. ``"error"`` leaves the graph unchanged
(the runtime refuses the step instead).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.fx as fx
from torch.utils._pytree import tree_map

from passes.capture import Capture, trace
from passes.errors import DPCompileError
from passes.grad_forms import Dense, GradForm, NormPlan, combine_sq_norms, fallback_rule
from passes.per_sample_rules import RuleContext, chain_form, per_sample_form, vmap_node
from passes.sample_dims import Analysis, SampleDim
from passes.samples import scale_samples, zero_samples
from passes.saved_values import is_zero_scalar
from passes.simplify import merge_duplicates

aten = torch.ops.aten

Clipping = Literal["flat", "per_layer"]
NonFinite = Literal["error", "drop"]
CLIP_EPSILON = 1e-6

# Ops that only re-lay out a gradient: forms follow them without materializing.
_VIEW_OPS = {
    aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.squeeze.dims,
    aten.squeeze.dim, aten.squeeze.default, aten.unsqueeze.default,
}
_IDENTITY_OPS = {aten.alias.default, aten.clone.default, aten.contiguous.default}
_TRANSPOSE_OPS = {aten.t.default, aten.transpose.int, aten.permute.default}


# Ops linear, sample by sample, in the operand at these positions when their other operands are
# fixed (see ``_Rewriter._linear_signal``): a select only when its other branch is zero, a matrix
# product only when the operand's samples are not summed over.
_LINEAR_OPERANDS: dict[Any, tuple[int, ...]] = {
    **{op: (0,) for op in _VIEW_OPS | _IDENTITY_OPS | _TRANSPOSE_OPS},
    aten.mul.Tensor: (0, 1), aten.neg.default: (0,), aten.div.Tensor: (0,),
    aten.threshold_backward.default: (0,), aten.where.self: (1, 2),
    aten.mm.default: (0, 1), aten.bmm.default: (0, 1),
}


@dataclass
class PrivateGraph:
    """The rewritten graph and what was decided while building it."""

    graph_module: fx.GraphModule
    capture: Capture
    clipping: Clipping
    plans: dict[str, NormPlan] = field(default_factory=dict)  # trainable name -> plan

    @property
    def params_with_grads(self) -> list[str]:
        return [self.capture.trainable[k] for k in self.capture.grad_for]


def gradient_region(analysis: Analysis) -> set[fx.Node]:
    """Reducing values and everything computed from them (parameter-shaped gradient math)."""
    starts: list[fx.Node] = []
    for node, index in analysis.reducing:
        if index is None:
            starts.append(node)
        else:
            starts += [u for u in node.users if u.target is operator.getitem and u.args[1] == index]
    return _computed_from(starts)


def _computed_from(starts: list[fx.Node]) -> set[fx.Node]:
    """``starts`` and every node computed from them (the output node aside)."""
    reached: set[fx.Node] = set()
    while starts:
        n = starts.pop()
        if n in reached or n.op == "output":
            continue
        reached.add(n)
        starts.extend(n.users)
    return reached


def _evaluate(target: Any, args: Any, kwargs: Any, env: dict[fx.Node, Any],
              replace: dict[fx.Node, Any] | None = None) -> Any:
    def value(arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            if replace is not None and arg in replace:
                return replace[arg]
            return env[arg]
        return arg

    return target(*tree_map(value, args), **tree_map(value, kwargs))


def _call(node: fx.Node, env: dict[fx.Node, Any], replace: dict[fx.Node, Any] | None = None) -> Any:
    return _evaluate(node.target, node.args, node.kwargs, env, replace)


def _with_output_mask(node: fx.Node, env: dict[fx.Node, Any], keep: set[int],
                      replace: dict[fx.Node, Any] | None = None) -> Any:
    """Run a multi-output op (convolution_backward, …) computing only the outputs in ``keep``."""
    schema = node.target._schema  # type: ignore[union-attr]
    names = [a.name for a in schema.arguments]
    if "output_mask" not in names:
        return _call(node, env, replace)
    position = names.index("output_mask")
    args, kwargs = list(node.args), dict(node.kwargs)
    mask = args[position] if position < len(args) else kwargs["output_mask"]
    mask = [bool(m) and k in keep for k, m in enumerate(mask)]
    if position < len(args):
        args[position] = mask
    else:
        kwargs["output_mask"] = mask
    return _evaluate(node.target, tuple(args), kwargs, env, replace)


class _Rewriter:
    """Evaluates the captured graph with the gradient region replaced (traced by passes.capture.trace)."""

    def __init__(self, capture: Capture, analysis: Analysis, clipping: Clipping,
                 nonfinite: NonFinite = "error", low_memory: bool = False) -> None:
        self.capture = capture
        self.low_memory = low_memory
        self.analysis = analysis
        self.clipping = clipping
        self.nonfinite = nonfinite
        self.graph = capture.graph_module.graph
        self.region = gradient_region(analysis)
        self.output_node = next(n for n in self.graph.nodes if n.op == "output")
        outputs = list(self.output_node.args[0])
        self.num_leaves = len(capture.output_is_differentiable)
        self.leaf_nodes = outputs[: self.num_leaves]
        self.grad_nodes = outputs[self.num_leaves :]
        self.plans: dict[str, NormPlan] = {}
        # multi-output reducing ops: outputs needed outside the region
        self.region_outputs: dict[fx.Node, set[int]] = {}
        for node, index in analysis.reducing:
            if index is not None:
                self.region_outputs.setdefault(node, set()).add(index)

    # ---- stage 1: forward and the backward outside the gradient region ---------------
    def run_outside_region(self, env: dict[fx.Node, Any]) -> None:
        for node in self.graph.nodes:
            if node.op in ("placeholder", "output") or node in self.region:
                continue
            if node in self.region_outputs:
                used = {
                    u.args[1] for u in node.users
                    if u.target is operator.getitem and u not in self.region
                }
                if not used:
                    continue
                env[node] = _with_output_mask(node, env, used)
                continue
            env[node] = _call(node, env)

    # ---- stage 2: per-sample forms and squared norms --------------------------------
    def forms(self, node: fx.Node, ctx: RuleContext, memo: dict[fx.Node, list[GradForm]]) -> list[GradForm]:
        if node in memo:
            return memo[node]
        reducing = self.analysis.reducing
        if (node, None) in reducing:
            result = [per_sample_form(ctx, node, None)]
        elif node.target is operator.getitem and (node.args[0], node.args[1]) in reducing:
            result = [per_sample_form(ctx, node.args[0], node.args[1])]
        else:
            result = self._follow(node, ctx, memo)
        memo[node] = result
        return result

    def _follow(self, node: fx.Node, ctx: RuleContext, memo: dict[fx.Node, list[GradForm]]) -> list[GradForm]:
        inputs = [a for a in node.all_input_nodes if a in self.region]
        shape = tuple(int(s) for s in node.meta["val"].shape)
        if node.target is aten.add.Tensor and len(inputs) == 2 and node.kwargs.get("alpha", 1) == 1:
            return self.forms(node.args[0], ctx, memo) + self.forms(node.args[1], ctx, memo)
        if len(inputs) == 1 and node.args[0] is inputs[0]:
            source = self.forms(inputs[0], ctx, memo)
            if node.target in _IDENTITY_OPS:
                return source
            if node.target in _VIEW_OPS:
                return [_same_rule(f.view(shape), f) for f in source]
            if node.target in _TRANSPOSE_OPS and len(shape) == 2:
                moved = [f.transpose() for f in source]
                if all(m is not None for m in moved):
                    return [_same_rule(m, f) for m, f in zip(moved, source)]  # type: ignore[arg-type]
        # Anything else: materialize the inputs and run the op per sample.
        batched, rules = {}, []
        for arg in inputs:
            rules += [f.rule for f in self.forms(arg, ctx, memo)]
            dense = [f.materialize() for f in self.forms(arg, ctx, memo)]
            total = dense[0]
            for d in dense[1:]:
                total = total + d
            batched[arg] = total
        chained = chain_form(ctx, node, batched)
        if chained is not None:
            return [chained]
        form = Dense(vmap_node(ctx, node, None, batched))
        form.rule = fallback_rule(rules, node.target)
        return [form]

    # ---- stage 4: clipped sums ------------------------------------------------------
    def clipped(self, node: fx.Node, env: dict[fx.Node, Any], weights: torch.Tensor,
                memo: dict[fx.Node, Any]) -> Any:
        if node in memo:
            return memo[node]
        reducing = self.analysis.reducing
        if (node, None) in reducing:
            carrier = reducing[(node, None)]
            value = self._scaled_call(node, env, carrier, weights, None)
        elif node.target is operator.getitem and (node.args[0], node.args[1]) in reducing:
            source = node.args[0]
            if source not in memo:
                carrier = reducing[(source, node.args[1])]
                memo[source] = self._scaled_call(
                    source, env, carrier, weights, self.region_outputs[source]
                )
            value = memo[source][node.args[1]]
        else:
            replace = {a: self.clipped(a, env, weights, memo) for a in node.all_input_nodes
                       if a in self.region}
            value = _call(node, env, replace)
        memo[node] = value
        return value

    def _scaled_call(self, node: fx.Node, env: dict[fx.Node, Any], carrier: fx.Node,
                     weights: torch.Tensor, keep: set[int] | None) -> Any:
        """Run a reducing node with one sample-carrying operand scaled by the clip factors."""
        operand = self._operand_to_scale(node, carrier)
        replace = self._scaled_operand(operand, env, weights)
        if keep is None:
            return _call(node, env, replace)
        return _with_output_mask(node, env, keep, replace)

    def _operand_to_scale(self, node: fx.Node, carrier: fx.Node) -> fx.Node:
        """For a contraction over samples (mm, bmm) scaling either operand gives Σ_b c_b·G_b:
        scale the smaller one. Other reducing ops are linear in their backward signal only."""
        if node.target not in (aten.mm.default, aten.bmm.default):
            return carrier
        operands = [a for a in node.args[:2] if isinstance(self.analysis.of(a), SampleDim)]
        if len(operands) < 2:
            return carrier
        for operand in operands:
            # A backward signal recomputable from a smaller one: scaling it frees it (below).
            if self._is_signal(operand) and self._smallest_upstream(self._views_of(operand)[-1])[0] > 0:
                return operand
        return min(operands, key=lambda a: a.meta["val"].numel())

    def _views_of(self, operand: fx.Node) -> list[fx.Node]:
        """``operand``, then the values it is a view, alias or transpose of, back to the source."""
        chain = [operand]
        while (
            chain[-1].target in _VIEW_OPS | _IDENTITY_OPS | _TRANSPOSE_OPS
            and isinstance(chain[-1].args[0], fx.Node)
            and isinstance(self.analysis.of(chain[-1].args[0]), SampleDim)
        ):
            chain.append(chain[-1].args[0])
        return chain

    def _scaled_operand(self, operand: fx.Node, env: dict[fx.Node, Any], weights: torch.Tensor) -> dict[fx.Node, Any]:
        """Scale ``operand`` where it is still in its producer's layout, then redo the views.

        Scaling a transposed view (``mm(gᵀ, a)``) would make Inductor materialize the transpose
        with strided reads; scaling before the chain of views keeps the pass contiguous.
        """
        chain = self._views_of(operand)
        source = chain[-1]
        replace: dict[fx.Node, Any] = {source: self._scaled_signal(source, env, weights)}
        for view in reversed(chain[:-1]):
            replace[view] = _call(view, env, replace)
        return replace

    def _scaled_signal(self, node: fx.Node, env: dict[fx.Node, Any], weights: torch.Tensor) -> Any:
        """``node``'s value with each sample scaled by the clip factors.

        When ``node`` is linear, per sample, in a backward signal at most half its size (an FFN's
        hidden gradient ``where(h > 0, g @ W, 0)`` from its output gradient ``g``), the smaller
        signal is scaled and ``node`` recomputed from it: the clipped sums then hold ``g`` instead
        of ``node`` until the clip factors exist. (A recomputation asked for twice, for a weight
        and its bias, is merged with :func:`merge_duplicates`.)
        """
        best, chain = self._smallest_upstream(node)
        sd = self.analysis.of(chain[best])
        assert isinstance(sd, SampleDim)
        value = scale_samples(env[chain[best]], sd, weights)
        for k in range(best - 1, -1, -1):
            value = _call(chain[k], env, {chain[k + 1]: value})
        return value

    def _smallest_upstream(self, node: fx.Node) -> tuple[int, list[fx.Node]]:
        """The signals ``node`` is linear in, one after the other (``node`` first), and the
        position of the one to scale: the smallest, if at most half ``node``'s size, else 0."""
        chain = [node]
        # Through at most one matrix product: each costs a product of the backward again.
        while (upstream := self._linear_signal(chain[-1])) is not None:
            chain.append(upstream)
            if chain[-2].target in (aten.mm.default, aten.bmm.default):
                break
        numel = [n.meta["val"].numel() for n in chain]
        best = min(range(len(chain)), key=lambda k: (numel[k], k))
        return (best if 2 * numel[best] <= numel[0] else 0), chain

    def _is_signal(self, node: fx.Node) -> bool:
        """A backward signal: computed from the seeds, before any sum over samples."""
        return self.analysis.is_tangent(node) and node not in self.region

    def _linear_signal(self, node: fx.Node) -> fx.Node | None:
        """The one backward signal ``node`` is linear in, sample by sample (its other inputs
        fixed: weights, forward values, masks), or None."""
        positions = _LINEAR_OPERANDS.get(node.target) if node.op == "call_function" else None
        if positions is None:
            return None
        signals = [a for a in node.all_input_nodes if self._is_signal(a)]
        if len(signals) != 1:
            return None
        (signal,) = signals
        sd = self.analysis.of(signal)
        uses: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), lambda a: uses.append(a) if a is signal else None)
        at = [k for k, a in enumerate(node.args) if a is signal]
        # Read once (a product of the signal with itself is not linear in it), where linear.
        if not isinstance(sd, SampleDim) or len(uses) != 1 or len(at) != 1 or at[0] not in positions:
            return None
        k = at[0]
        if node.target is aten.where.self:
            return signal if is_zero_scalar(node.args[3 - k]) else None
        if node.target in (aten.mm.default, aten.bmm.default):
            batched = node.target is aten.bmm.default
            free = (1 if k == 0 else 2) if batched else (0 if k == 0 else 1)
            return signal if sd.dim == free or (batched and sd.dim == 0) else None
        return signal

    # ---- the whole step ---------------------------------------------------------------
    def __call__(self, *flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        placeholders = self.capture.placeholders()
        env: dict[fx.Node, Any] = dict(zip(placeholders, flat[: len(placeholders)]))
        mask, max_grad_norm = flat[len(placeholders)], flat[len(placeholders) + 1]
        self.run_outside_region(env)

        ctx = RuleContext(self.analysis, env)
        memo: dict[fx.Node, list[GradForm]] = {}
        sq_norms, dense_grads = [], []
        for k, grad in zip(self.capture.grad_for, self.grad_nodes):
            name = self.capture.trainable[k]
            try:
                sq, plan, dense = combine_sq_norms(self.forms(grad, ctx, memo), name)
            except NotImplementedError as error:
                raise DPCompileError(f"parameter `{name}`: {error}") from error
            self.plans[name] = plan
            sq_norms.append(sq)
            dense_grads.append(dense)

        sq = torch.stack(sq_norms, 1)  # (B, P)
        if self.clipping == "flat":
            norms = sq.sum(1).clamp(min=0).sqrt()
            factors = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0) * mask
            per_param = [factors] * len(sq_norms)
        else:
            norms = sq.clamp(min=0).sqrt()
            factors = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0) * mask[:, None]
            per_param = list(factors.unbind(1))
        outputs = [env[n] if isinstance(n, fx.Node) else n for n in self.leaf_nodes]
        if self.low_memory and self.clipping == "flat" and self.nonfinite == "error":
            second = self._second_backward(env, factors)
            if second is not None:
                return (*outputs, norms, *second)
        clip_env: dict[fx.Node, Any] = env
        if self.nonfinite == "drop":
            per_param, clip_env, dense_grads = self._drop_nonfinite(sq, mask, per_param, env, dense_grads)

        clipped = []
        shared_memo: dict[fx.Node, Any] = {}
        for grad, weights, dense in zip(self.grad_nodes, per_param, dense_grads):
            if dense is not None:
                clipped.append(_weighted_sum(weights, dense))
                continue
            memo_c = shared_memo if self.clipping == "flat" else {}
            clipped.append(self.clipped(grad, clip_env, weights, memo_c))
        return (*outputs, norms, *clipped)

    # ---- low_memory: clipped sums from a second backward ---------------------------------
    def _second_backward(self, env: dict[fx.Node, Any], factors: torch.Tensor) -> list[Any] | None:
        """Σ_b c_b·g_b as the gradients of Σ_b c_b·L_b: the backward again, from seeds scaled by
        the clip factors. The first backward's signals are then dead once their norms are taken,
        instead of living until the factors exist. None when a seed has no sample dimension."""
        seeds = self.capture.seed_placeholders()
        scaled = dict(env)
        for seed in seeds:
            sd = self.analysis.of(seed)
            if not isinstance(sd, SampleDim):
                return None
            scaled[seed] = scale_samples(env[seed], sd, factors)
        downstream = _computed_from(list(seeds))
        for node in self.graph.nodes:
            if node.op == "call_function" and (node in downstream or node in self.region):
                scaled[node] = _call(node, scaled)
        return [scaled[g] for g in self.grad_nodes]

    # ---- nonfinite="drop" ---------------------------------------------------------------
    def _drop_nonfinite(self, sq: torch.Tensor, mask: torch.Tensor, per_param: list[torch.Tensor],
                        env: dict[fx.Node, Any], dense_grads: list[Any]) -> tuple[Any, Any, Any]:
        """Zero the clip factors of samples with a non-finite gradient, and their values."""
        keep = torch.isfinite(sq).all(1) & (mask != 0)
        per_param = [torch.where(keep, w, torch.zeros_like(w)) for w in per_param]
        dense_grads = [None if d is None else _zero_dropped(keep, d) for d in dense_grads]
        return per_param, _ZeroedSamples(env, self.analysis, keep), dense_grads


class _ZeroedSamples(dict):  # type: ignore[type-arg]
    """A view of ``env`` in which every floating per-sample value is zero for dropped samples."""

    def __init__(self, env: dict[fx.Node, Any], analysis: Analysis, keep: torch.Tensor) -> None:
        super().__init__()
        self.env, self.analysis, self.keep = env, analysis, keep

    def __missing__(self, node: fx.Node) -> Any:
        value = self.env[node]
        sd = self.analysis.of(node)
        if isinstance(sd, SampleDim) and isinstance(value, torch.Tensor) and value.is_floating_point():
            value = zero_samples(value, sd, self.keep)
        self[node] = value
        return value

    def __contains__(self, node: object) -> bool:
        return node in self.env


def _weighted_sum(weights: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
    """Σ_b weights[b]·G_b over per-sample gradients held as consecutive sample blocks."""
    parts = [
        torch.einsum("b,b...->...", w.to(block.dtype), block)
        for w, block in zip(weights.split([b.shape[0] for b in blocks]), blocks)
    ]
    return torch.stack(parts).sum(0) if len(parts) > 1 else parts[0]


def _zero_dropped(keep: torch.Tensor, blocks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The sample blocks with dropped samples' gradients set to 0 (``where``: NaN-safe)."""
    return [
        torch.where(k.view(-1, *[1] * (block.dim() - 1)), block, torch.zeros_like(block))
        for k, block in zip(keep.split([b.shape[0] for b in blocks]), blocks)
    ]


def _same_rule(form: GradForm, source: GradForm) -> GradForm:
    form.rule = source.rule
    return form


def private_backward(
    capture: Capture,
    analysis: Analysis,
    clipping: Clipping = "flat",
    example_inputs: list[torch.Tensor] | None = None,
    nonfinite: NonFinite = "error",
    low_memory: bool = False,
) -> PrivateGraph:
    """Rewrite the joint graph into per-sample norms and clipped sums (one backward pass).

    ``nonfinite="drop"`` makes samples with a NaN/Inf gradient contribute exactly nothing.
    ``low_memory=True`` (flat clipping, ``nonfinite="error"``) takes the clipped sums from a
    second backward with the seeds scaled by the clip factors: one more backward of time, and the
    peak no longer holds every layer's backward signal at once. Elsewhere it changes nothing.
    """
    if clipping not in ("flat", "per_layer"):
        raise ValueError(f"clipping must be 'flat' or 'per_layer', got {clipping!r}")
    if nonfinite not in ("error", "drop"):
        raise ValueError(f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")
    rewriter = _Rewriter(capture, analysis, clipping, nonfinite, low_memory)
    if example_inputs is None:
        example_inputs = example_private_inputs(capture)
        if clipping == "per_layer":
            example_inputs[-1] = example_inputs[-1].expand(len(capture.grad_for)).clone()
    graph_module = merge_duplicates(trace(rewriter, *example_inputs))
    graph_module.graph.eliminate_dead_code()
    graph_module.recompile()
    return PrivateGraph(graph_module, capture, clipping, dict(rewriter.plans))


def example_private_inputs(capture: Capture) -> list[torch.Tensor]:
    """Inputs of the private graph: the capture's example values, a full mask, C = 1."""
    ref = capture.example_inputs[0]
    mask = torch.ones(capture.batch_size, dtype=ref.dtype, device=ref.device)
    max_norm = torch.ones((), dtype=ref.dtype, device=ref.device)
    return [*capture.example_inputs, mask, max_norm]
