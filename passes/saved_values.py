"""saved_values: smaller forward values saved for the backward, with the same gradients.

After the min-cut split, a conv → ReLU → average-pool block still saves its ReLU output in full
precision, for two readers that need less: the pool's backward reads only its shape, and the
ReLU's backward (decomposed into ``where(out <= 0, 0, g)``) one bit per value. On the Opacus
CIFAR-10 CNN at batch 256 those outputs were 52 MiB, and the private step's tensor peak 96 MiB
against 73 MiB for non-private training. The passes here make the backward read an unfilled
tensor for a shape and a byte per value for a mask: the forward saves 13 MiB of masks instead,
and the peak is 77 MiB.

Bytes, not booleans, and a select on the byte converted to the gradient's type: measured on 2
Intel cores for (256, 32, 32, 32) float32, Inductor's CPU kernels store ``x <= 0`` as booleans
in 49 ms and as bytes (a select of integers, then a cast) in 3 ms; ``where`` on a loaded byte or
boolean runs in 24–32 ms, on the byte converted to float in 8.4 ms (a multiplication takes as
long, but turns an Inf gradient at a masked position into NaN instead of 0).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.fx as fx

if TYPE_CHECKING:
    from passes.partition import SplitGraphs

aten = torch.ops.aten

# Node meta keys for what these passes add (channels_last_masks_and_shapes relays them).
UNFILLED = "dpcompile_unfilled"  # an empty tensor that only lends its shape
BYTE_MASK = "dpcompile_byte_mask"  # a saved mask, one byte per value

# Op -> position of an argument whose shape, dtype and device the op reads, but not its values.
SHAPE_ONLY_ARGUMENT: dict[Any, int] = {
    aten.avg_pool2d_backward.default: 1,
    aten.avg_pool3d_backward.default: 1,
    aten._adaptive_avg_pool2d_backward.default: 1,
    aten._adaptive_avg_pool3d_backward.default: 1,
    aten.max_pool2d_with_indices_backward.default: 1,
    aten.max_pool3d_with_indices_backward.default: 1,
    aten.zeros_like.default: 0,
    aten.ones_like.default: 0,
    aten.empty_like.default: 0,
    aten.new_zeros.default: 0,
    aten.new_empty.default: 0,
}

COMPARISONS = {
    aten.le.Scalar, aten.lt.Scalar, aten.ge.Scalar, aten.gt.Scalar, aten.eq.Scalar, aten.ne.Scalar,
}

SAME_VALUES = {
    aten.alias.default, aten.view.default, aten._unsafe_view.default, aten.reshape.default,
    aten.detach.default,
}


def shape_only_reads(graphs: SplitGraphs) -> SplitGraphs:
    """The same split, with backward ops that read only the shape of a saved value reading an
    unfilled tensor of that shape, so that the value is no longer needed for them."""
    backward = copy.deepcopy(graphs.backward)
    saved = set([n for n in backward.graph.nodes if n.op == "placeholder"][: graphs.num_saved])
    changed = False
    for node in list(backward.graph.nodes):
        position = SHAPE_ONLY_ARGUMENT.get(node.target) if node.op == "call_function" else None
        if position is None or position >= len(node.args):
            continue
        argument = node.args[position]
        if not isinstance(argument, fx.Node) or same_values_base(argument) not in saved:
            continue
        value = argument.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.layout != torch.strided:
            continue
        with backward.graph.inserting_before(node):
            unfilled = backward.graph.call_function(aten.empty_strided.default, (list(value.shape), list(value.stride())),
                                                    {"dtype": value.dtype, "device": value.device})
        unfilled.meta.update({"val": _fake_strided(value, value.stride(), value.dtype), UNFILLED: True})
        node.update_arg(position, unfilled)
        changed = True
    if not changed:
        return graphs
    backward.graph.eliminate_dead_code()
    backward.recompile()
    return dataclasses.replace(graphs, backward=backward)


def saved_masks_as_bytes(graphs: SplitGraphs) -> SplitGraphs:
    """The same split, with every saved value that the backward reads only as the mask of
    ``where(x ⋈ c, 0, g)`` (a ReLU's backward) saved as that mask, one byte per value, and applied
    by a ``where`` that gives the same values."""
    forward, backward = copy.deepcopy(graphs.forward), copy.deepcopy(graphs.backward)
    output = forward.graph.output_node()
    results = _results(output)
    inputs = [n for n in backward.graph.nodes if n.op == "placeholder"][: graphs.num_saved]
    replaced = []
    for k, placeholder in enumerate(inputs):
        found = _mask_reads(placeholder)
        if found is None or not isinstance(results[graphs.num_outputs + k], fx.Node):
            continue
        condition, wheres, zero_when_true = found
        stored = results[graphs.num_outputs + k]
        with forward.graph.inserting_before(output):
            results[graphs.num_outputs + k] = _byte_mask(forward.graph, stored, condition, zero_when_true)
        with backward.graph.inserting_before(placeholder):
            keep = backward.graph.placeholder(f"{placeholder.name}_keep")
        mask = results[graphs.num_outputs + k].meta["val"]
        keep.meta["val"] = _fake_strided(placeholder.meta["val"], mask.stride(), mask.dtype)
        for where in wheres:
            zero, gradient = (where.args[1], where.args[2]) if zero_when_true else (where.args[2], where.args[1])
            assert isinstance(zero, fx.Node) and isinstance(gradient, fx.Node)  # as _mask_reads checked
            with backward.graph.inserting_before(where):
                masked = _masked(backward.graph, gradient, keep, zero)
            where.replace_all_uses_with(masked)
        replaced.append(placeholder)
    if not replaced:
        return graphs
    backward.graph.eliminate_dead_code()
    for placeholder in replaced:
        assert not placeholder.users, "a mask's source is still read"  # _mask_reads checked every reader
        backward.graph.erase_node(placeholder)
    output.args = (tuple(results),)
    forward.graph.eliminate_dead_code()
    forward.recompile()
    backward.recompile()
    return dataclasses.replace(graphs, forward=forward, backward=backward)


def _results(output: fx.Node) -> list[Any]:
    """The values an output node returns, as a list."""
    return list(cast(Sequence[Any], output.args[0]))


def same_values_base(node: fx.Node) -> fx.Node:
    """The node whose values ``node`` holds in the same (row-major) order, through views."""
    while node.op == "call_function" and node.target in SAME_VALUES and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _mask_reads(placeholder: fx.Node) -> tuple[fx.Node, list[fx.Node], bool] | None:
    """``(condition, wheres, zero_when_true)`` when every read of the saved ``placeholder`` is a
    comparison with a scalar (or, for a saved boolean, the value itself) that serves only as the
    condition of ``where``s setting the other branch to zero, all with the same zero branch."""
    value = placeholder.meta.get("val")
    if not isinstance(value, torch.Tensor):
        return None
    conditions: list[fx.Node] = []
    frontier, seen = [placeholder], set()
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if value.dtype == torch.bool and any(u.target is aten.where.self for u in node.users):
            conditions.append(node)
            continue
        for user in node.users:
            if user.op == "call_function" and user.target in SAME_VALUES and user.args[0] is node:
                frontier.append(user)
            elif (user.op == "call_function" and user.target in COMPARISONS and user.args[0] is node
                  and not user.kwargs and not any(isinstance(a, fx.Node) for a in user.args[1:])):
                conditions.append(user)
            else:
                return None
    if len(set(conditions)) != 1:
        return None
    condition = conditions[0]
    wheres, zero_branches = list(condition.users), set()
    for where in wheres:
        if where.target is not aten.where.self or where.args[0] is not condition:
            return None
        zero_branch = next((k for k in (1, 2) if is_zero_scalar(where.args[k])), None)
        gradient = where.args[3 - zero_branch] if zero_branch is not None else None
        if gradient is None or not _same_shape_float(where, gradient, condition):
            return None
        zero_branches.add(zero_branch)
    if len(zero_branches) != 1:
        return None
    return condition, wheres, zero_branches.pop() == 1


def is_zero_scalar(node: Any) -> bool:
    """A 0-dim +0 made by ``scalar_tensor`` or ``full``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target is aten.scalar_tensor.default:
        fill = node.args[0]
    elif node.target is aten.full.default and node.args[0] in ([], ()):
        fill = node.args[1]
    else:
        return False
    return isinstance(fill, (int, float)) and fill == 0 and math.copysign(1.0, fill) > 0


def _same_shape_float(where: fx.Node, gradient: Any, condition: fx.Node) -> bool:
    """``where`` broadcasts nothing and returns ``gradient``'s float type."""
    out, grad, cond = (n.meta.get("val") if isinstance(n, fx.Node) else None for n in (where, gradient, condition))
    if not (isinstance(out, torch.Tensor) and isinstance(grad, torch.Tensor) and isinstance(cond, torch.Tensor)):
        return False
    return out.shape == grad.shape == cond.shape and out.dtype == grad.dtype and grad.is_floating_point()


def _byte_mask(graph: fx.Graph, stored: fx.Node, condition: fx.Node, zero_when_true: bool) -> fx.Node:
    """Forward nodes computing the bytes ``keep = 0 if condition else 1`` (``1 if`` for
    ``zero_when_true=False``) from the value the forward used to save."""
    value = stored
    shape = list(condition.meta["val"].shape)
    if list(stored.meta["val"].shape) != shape:
        value = _call(graph, aten.reshape.default, (stored, shape))
    if condition.target in COMPARISONS:
        value = _call(graph, condition.target, (value, *condition.args[1:]))
    kept, dropped = (0, 1) if zero_when_true else (1, 0)
    # Inductor's CPU kernels store a select of integers fast and a boolean cast slowly.
    choice = _call(graph, aten.where.Scalar, (value, kept, dropped))
    mask = _call(graph, aten._to_copy.default, (choice,), {"dtype": torch.uint8}, name=f"{stored.name}_keep")
    mask.meta[BYTE_MASK] = True
    return mask


def _masked(graph: fx.Graph, gradient: fx.Node, keep: fx.Node, zero: fx.Node) -> fx.Node:
    """``where(keep, gradient, zero)``, with ``keep`` compared after conversion to the gradient's
    type: Inductor's CPU kernels vectorize that, and not a select on a loaded byte or boolean."""
    flags = _call(graph, aten._to_copy.default, (keep,), {"dtype": gradient.meta["val"].dtype})
    kept = _call(graph, aten.gt.Scalar, (flags, 0))
    return _call(graph, aten.where.self, (kept, gradient, zero))


def _call(graph: fx.Graph, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
          name: str | None = None) -> fx.Node:
    """A new node with its fake value, computed in the fake mode of its first input."""
    kwargs = kwargs or {}
    node = graph.create_node("call_function", target, args, kwargs, name=name)
    mode = next(a.meta["val"] for a in args if isinstance(a, fx.Node)).fake_mode
    fake = torch.fx.node.map_arg(args, lambda n: n.meta["val"]), torch.fx.node.map_arg(kwargs, lambda n: n.meta["val"])
    with mode:
        node.meta["val"] = target(*fake[0], **fake[1])
    return node


def _fake_strided(reference: torch.Tensor, stride: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """A fake tensor of ``reference``'s shape and device, in its fake mode, with these strides and dtype."""
    with reference.fake_mode:  # type: ignore[attr-defined]
        return torch.empty_strided(reference.shape, stride, dtype=dtype, device=reference.device)


def channels_last_masks_and_shapes(graphs: SplitGraphs) -> SplitGraphs:
    """The same split, with each saved byte mask and each unfilled shape tensor of 4 or 5
    dimensions laid out channels-last (the values unchanged).

    For a convolution net that Inductor computes channels-last: it fills a byte mask in the
    traced (NCHW) order otherwise, a transposing store, and the backward kernels that read it then
    run unvectorized in that order (measured on the CIFAR-10 CNN at batch 256: 23 ms for the
    first layer's ReLU backward, against 2 ms channels-last). A pooling backward's result takes
    the layout of the tensor it reads the shape of, and then could not be written in place of a
    channels-last saved activation."""
    saved = _results(graphs.forward.graph.output_node())[graphs.num_outputs :]
    if not (any(_spatial(n, BYTE_MASK) for n in saved) or any(_spatial(n, UNFILLED) for n in graphs.backward.graph.nodes)):
        return graphs
    forward, backward = copy.deepcopy(graphs.forward), copy.deepcopy(graphs.backward)
    output = forward.graph.output_node()
    results = _results(output)
    for k in range(graphs.num_outputs, len(results)):
        mask = results[k]
        if not _spatial(mask, BYTE_MASK):
            continue
        value = mask.meta["val"]
        last = [0, *range(2, value.dim()), 1]
        back = [0, value.dim() - 1, *range(1, value.dim() - 1)]
        with forward.graph.inserting_before(output):
            filled = _call(forward.graph, aten.clone.default, (_call(forward.graph, aten.permute.default, (mask, last)),),
                           {"memory_format": torch.contiguous_format})
            results[k] = _call(forward.graph, aten.permute.default, (filled, back))
    output.args = (tuple(results),)
    for node in backward.graph.nodes:
        if _spatial(node, UNFILLED):
            value = node.meta["val"]
            layout = torch.channels_last if value.dim() == 4 else torch.channels_last_3d
            strides = list(torch.empty(value.shape, device="meta").contiguous(memory_format=layout).stride())
            node.args = (node.args[0], strides)
            node.meta["val"] = _fake_strided(value, strides, value.dtype)
    forward.recompile()
    backward.recompile()
    return dataclasses.replace(graphs, forward=forward, backward=backward)


def _spatial(node: Any, key: str) -> bool:
    """``node`` was added by these passes (its meta has ``key``) and has 4 or 5 dimensions."""
    return isinstance(node, fx.Node) and bool(node.meta.get(key)) and node.meta["val"].dim() in (4, 5)
