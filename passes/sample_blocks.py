"""sample_blocks: a first convolution's output gradient made a block of samples at a time.

On CPU a convolution's per-sample weight gradients may come from one ``dpcompile::conv_window_grads``
call that unfolds the input's windows a block of samples at a time. Its output gradient, though,
exists whole before the call: for a network's first layer it is the largest backward value and
nothing else reads it (no input gradient is taken). On the Opacus CIFAR-10 CNN at batch 256 that
is the first layer's 32 MiB ``where(mask, 0, avg_pool2d_backward(g))``, the largest tensor live at
the private step's peak (77 MiB of tensors, non-private training's peak being 73 MiB).

The pass here recomputes such a gradient block by block from slices of what it is made from (the
pooling backward's input gradient, the saved byte mask), each block right before a window call
of its own, so at most one block is live. Inductor keeps each block's kernel apart and in order
between the calls (extern kernels are not fused across), and reuses one block's buffer for the
next. The values are the same: every op recomputed acts on each sample alone.

What the blocks are sliced from stays live until the last block, where the whole gradient would
have freed it; so a gradient is blocked only if those values are smaller than it less one block.
A GroupNorm's backward reads its input and its output gradient, each the gradient's size: on a
GroupNorm CNN (32×32 inputs, batch 256) blocking it through the norm's decomposed backward raised
the step's tensor peak 174.0 → 182.6 MiB, and the rule leaves it whole.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx

from passes.saved_values import UNFILLED

if TYPE_CHECKING:
    from passes.partition import SplitGraphs

aten = torch.ops.aten

# The output gradient is recomputed about this many bytes of samples at a time (at least one block
# of the window call's own). On the CIFAR-10 CNN: 8 blocks of 32 samples for the first layer.
CONV_GRAD_BLOCK_BYTES_CPU = 4 << 20

# Ops acting on each sample alone whose tensor arguments all hold the samples first, with no
# argument to respell for a block (besides pointwise ops, and conversions of the dtype alone).
PER_SAMPLE_OPS = {
    aten.avg_pool2d_backward.default, aten.avg_pool3d_backward.default,
    aten.max_pool2d_with_indices_backward.default, aten.max_pool3d_with_indices_backward.default,
    aten._adaptive_avg_pool2d_backward.default, aten._adaptive_avg_pool3d_backward.default,
    aten.adaptive_max_pool2d_backward.default, aten.adaptive_max_pool3d_backward.default,
}


def output_gradients_in_blocks(graphs: SplitGraphs) -> SplitGraphs:
    """The same split, with each window call whose output gradient is read by it alone, and made
    by per-sample ops, taking that gradient a block of samples at a time (each block recomputed
    from slices of the ops' inputs just before its own call)."""
    if not _window_calls(graphs.backward.graph):
        return graphs
    backward = copy.deepcopy(graphs.backward)
    changed = False
    for call in _window_calls(backward.graph):
        changed |= _in_blocks(backward.graph, call)
    if not changed:
        return graphs
    backward.graph.eliminate_dead_code()
    backward.graph.lint()
    backward.recompile()
    return dataclasses.replace(graphs, backward=backward)


def _window_calls(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.target is torch.ops.dpcompile.conv_window_grads.default]


def _in_blocks(graph: fx.Graph, call: fx.Node) -> bool:
    """Replace ``call`` by one call per block of samples and their concatenation, if its output
    gradient can be recomputed by block (see the module docstring)."""
    x, grad = call.args[0], call.args[1]
    outer, inner, samples_per_block = call.args[7], call.args[8], call.args[9]
    if not (isinstance(x, fx.Node) and isinstance(grad, fx.Node) and isinstance(samples_per_block, int)) \
            or outer != 1 or inner != 1:
        return False
    value = grad.meta.get("val")
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or set(grad.users) != {call}:
        return False
    batch = value.shape[0]
    per_sample = value[0].numel() * value.element_size()
    per_block = max(samples_per_block, CONV_GRAD_BLOCK_BYTES_CPU // max(per_sample, 1))
    if per_block >= batch or not _per_sample(grad, batch):
        return False
    recomputed = {grad}
    grew = True
    while grew:  # upstream values read only by recomputed ones are recomputed too
        grew = False
        for member in list(recomputed):
            for a in member.all_input_nodes:
                if a not in recomputed and _per_sample(a, batch) and all(u in recomputed for u in a.users):
                    recomputed.add(a)
                    grew = True
    # The values sliced stay live until the last block, where the whole gradient would have
    # freed them: worth it only if they are smaller than the gradient less one block. (A
    # GroupNorm's backward reads its input and output gradient, each the gradient's size.)
    leaves = {a for m in recomputed for a in m.all_input_nodes if a not in recomputed and _sample_rows(m, a, batch)}
    held = sum(a.meta["val"].numel() * a.meta["val"].element_size() for a in leaves)
    if held >= (batch - per_block) * per_sample:
        return False
    fake_mode = value.fake_mode  # type: ignore[attr-defined]
    blocks = []
    with graph.inserting_before(call), fake_mode:
        for lo in range(0, batch, per_block):
            hi = min(batch, lo + per_block)
            block_grad = _block_of(graph, grad, recomputed, batch, lo, hi, {})
            args = (_sliced(graph, x, lo, hi), block_grad, *call.args[2:9], min(samples_per_block, hi - lo),
                    *call.args[10:])
            blocks.append(_node(graph, call.target, args, dict(call.kwargs)))
        joined = _node(graph, aten.cat.default, (blocks, 0), {})
    call.replace_all_uses_with(joined)
    graph.erase_node(call)
    return True


def _per_sample(node: fx.Node, batch: int) -> bool:
    """``node`` computes each of ``batch`` samples (its first dimension) from that sample's rows
    of its inputs alone: a pointwise op whose inputs are samples-first or broadcast over the
    samples, a per-sample backward op, or an unfilled tensor lending a shape."""
    value = node.meta.get("val")
    if node.op != "call_function" or not isinstance(value, torch.Tensor) or value.dim() == 0 or value.shape[0] != batch:
        return False
    if node.target is aten.empty_strided.default:
        return bool(node.meta.get(UNFILLED))
    target: Any = node.target
    if target in PER_SAMPLE_OPS:
        return all(_sample_rows(node, a, batch) for a in node.all_input_nodes)
    tags = getattr(target, "tags", ())
    schema = getattr(target, "_schema", None)
    if torch.Tag.nondeterministic_seeded in tags or schema is None or schema.is_mutable:
        return False  # a random draw or a write must happen once, not once per block
    if target is aten._to_copy.default:
        pointwise = set(node.kwargs) <= {"dtype"}
    else:
        pointwise = torch.Tag.pointwise in tags
    return pointwise and all(_sample_rows(node, a, batch) or _broadcast(a, value.dim()) for a in node.all_input_nodes)


def _sample_rows(node: fx.Node, argument: fx.Node, batch: int) -> bool:
    """``argument`` holds one row per sample, aligned with ``node``'s samples: of ``node``'s rank
    (a pointwise op broadcasts from the last dimension) and ``batch`` rows."""
    value, result = argument.meta.get("val"), node.meta.get("val")
    return isinstance(value, torch.Tensor) and isinstance(result, torch.Tensor) \
        and value.dim() == result.dim() and value.shape[0] == batch


def _broadcast(node: fx.Node, dims: int) -> bool:
    """A pointwise op's input that broadcasts along the samples (fewer dimensions, or one row)."""
    value = node.meta.get("val")
    return not isinstance(value, torch.Tensor) or value.dim() < dims or value.shape[0] == 1


def _block_of(graph: fx.Graph, node: fx.Node, recomputed: set[fx.Node], batch: int, lo: int, hi: int,
              done: dict[fx.Node, fx.Node]) -> fx.Node:
    """Samples ``lo:hi`` of ``node``: recomputed when in ``recomputed``, else a slice."""
    if node in done:
        return done[node]
    if node not in recomputed:
        done[node] = _sliced(graph, node, lo, hi)
        return done[node]
    if node.target is aten.empty_strided.default:
        shape, stride = node.args[0], node.args[1]
        block = _node(graph, node.target, ([hi - lo, *list(shape)[1:]], stride), dict(node.kwargs))  # type: ignore[arg-type]
        block.meta[UNFILLED] = True
    else:
        def block_of(a: fx.Node) -> fx.Node:
            return _block_of(graph, a, recomputed, batch, lo, hi, done) if _sample_rows(node, a, batch) else a

        args, kwargs = fx.node.map_arg((node.args, dict(node.kwargs)), block_of)
        block = _node(graph, node.target, args, kwargs)
    done[node] = block
    return block


def _sliced(graph: fx.Graph, node: fx.Node, lo: int, hi: int) -> fx.Node:
    return _node(graph, aten.slice.Tensor, (node, 0, lo, hi), {})


def _node(graph: fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> fx.Node:
    """A new node with its fake value (inside the graph's fake mode)."""
    node = graph.call_function(target, args, kwargs)
    node.meta["val"] = target(*fx.node.map_arg(args, lambda a: a.meta["val"]),
                              **fx.node.map_arg(kwargs, lambda a: a.meta["val"]))
    return node
