"""simplify: clean-ups of a rewritten graph that change no value.

The rewrite emits each parameter's norm terms on its own, so a value two parameters need (the
Gram of an LSTM's gate gradients serves both of its weight matrices) appears twice, reached
through views that differ only in how a shape is spelled (``[-1, 32]`` and ``[30, 32]``).
Inductor does not merge duplicated extern kernels such as ``bmm``; this pass does.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

_VIEWS = {torch.ops.aten.view.default, torch.ops.aten.reshape.default, torch.ops.aten._unsafe_view.default}


def merge_duplicates(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The same graph with every pure computation done once (identical op and arguments merged)."""
    graph = graph_module.graph
    first: dict[Any, fx.Node] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or not _pure(node):
            continue
        _spell_out_shape(node)
        try:
            key = (node.target, _frozen(node.args), _frozen(node.kwargs))
            earlier = first.get(key)
        except TypeError:  # an argument that cannot be compared by value
            continue
        if earlier is None:
            first[key] = node
        else:
            node.replace_all_uses_with(earlier)
            graph.erase_node(node)
    _distinct_outputs(graph)
    graph.lint()
    graph_module.recompile()
    return graph_module


def _distinct_outputs(graph: fx.Graph) -> None:
    """Merged results returned twice get a copy each: callers may write to one output in place
    (noise added to a gradient) without changing another."""
    output = graph.output_node()
    seen: set[fx.Node] = set()

    def distinct(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return type(value)(distinct(v) for v in value)
        if not isinstance(value, fx.Node) or value.op == "placeholder":
            return value
        if value in seen:
            with graph.inserting_before(output):
                copy = graph.call_function(torch.ops.aten.clone.default, (value,))
            copy.meta = dict(value.meta)
            return copy
        seen.add(value)
        return value

    output.args = distinct(output.args)


def _pure(node: fx.Node) -> bool:
    if node.is_impure():
        return False
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        # random ops must run once per call site; mutating ops have effects beyond their result
        return torch.Tag.nondeterministic_seeded not in target.tags and not target._schema.is_mutable
    return True


def _spell_out_shape(node: fx.Node) -> None:
    """``view(x, [-1, 32])`` → ``view(x, [30, 32])``, from the traced shape (static shapes only)."""
    if node.target not in _VIEWS or len(node.args) < 2:
        return
    shape = node.args[1]
    val = node.meta.get("val")
    if isinstance(shape, (list, tuple)) and -1 in shape and isinstance(val, torch.Tensor):
        if all(isinstance(s, int) for s in val.shape):
            node.args = (node.args[0], list(val.shape), *node.args[2:])


def _frozen(value: Any) -> Any:
    """A hashable key that equals another only for the same argument (0.0 ≠ -0.0, 1 ≠ True)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _frozen(v)) for k, v in value.items())))
    if isinstance(value, fx.Node):
        return value
    if isinstance(value, float):
        return ("float", repr(value))
    if isinstance(value, (bool, int, str, type(None), torch.dtype, torch.device, torch.layout,
                          torch.memory_format)):
        return (type(value).__name__, value)
    raise TypeError(f"no value key for {type(value).__name__}")
