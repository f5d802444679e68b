"""partition: split a private graph into a forward graph and a private-backward graph.

A training loop runs the forward, lets the caller's loss produce the output gradients, then runs
the backward. :func:`split` cuts the rewritten joint graph at the seeds:

    forward:  (*trainable, *frozen, *buffers, *batch) -> (*outputs, *saved)
    backward: (*saved, *seeds, mask, max_grad_norm)    -> (per_sample_norms, *clipped_grads)

Backward nodes are those that depend on the seeds, the mask or the clipping bound. Which forward
values to save is decided by PyTorch's min-cut rematerialization partitioner (the one AOTAutograd
uses): cheap pointwise values are recomputed in the backward instead of saved. Measured on a
784-512-512-10 MLP at batch 256 (2 CPU cores): saving every forward value the backward reads made
the compiled forward 2.9 ms and the backward 3.3 ms (Inductor's kernel for the saved ReLU masks,
a boolean store, alone took 0.5 ms); the min-cut split makes them 1.8 ms and 2.7 ms.
:func:`split_saving_all` is the plain cut, kept as a fallback. :mod:`passes.saved_values` then
shrinks what the forward saves: shapes instead of tensors, byte masks instead of activations.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.rewrite import PrivateGraph
from passes.sample_blocks import output_gradients_in_blocks
from passes.saved_values import (
    COMPARISONS,
    same_values_base,
    saved_masks_as_bytes,
    shape_only_reads,
)


@dataclass
class SplitGraphs:
    forward: fx.GraphModule
    backward: fx.GraphModule
    num_outputs: int  # model output leaves returned by the forward before the saved values
    num_saved: int


def split(private: PrivateGraph) -> SplitGraphs:
    """Cut the private graph at the seeds, recomputing cheap forward values in the backward and
    saving no more of the rest than the backward reads (see :mod:`passes.saved_values`); a first
    convolution's output gradient is then made a block of samples at a time
    (:mod:`passes.sample_blocks`)."""
    try:
        graphs = split_min_cut(private)
    except Exception:  # the partitioner is a private torch API: never fail a compile on it
        graphs = split_saving_all(private)
    return output_gradients_in_blocks(saved_masks_as_bytes(shape_only_reads(recompute_saved_masks(graphs))))


def recompute_saved_masks(graphs: SplitGraphs) -> SplitGraphs:
    """The same split, with every saved boolean mask that compares another saved value with a
    scalar (a ReLU's ``le(out, 0)``) computed in the backward instead of saved.

    The backward reads the compared value anyway, so this saves memory and a store: Inductor's
    CPU kernels write boolean tensors slowly (measured on 2 AMD EPYC cores, AVX512: storing
    ``h <= 0`` for an (8192, 512) tensor took 27 ms compiled against 1.2 ms eager and 0.9 ms for
    the same comparison kept inside a kernel; it was a fifth of the transformer's private step).
    """
    forward, backward = copy.deepcopy(graphs.forward), copy.deepcopy(graphs.backward)
    output = next(n for n in forward.graph.nodes if n.op == "output")
    results = list(output.args[0])
    saved = results[graphs.num_outputs :]
    # Saved values by the node they reshape (a compared value is often a view of a saved one).
    position = {same_values_base(node): k for k, node in enumerate(saved) if isinstance(node, fx.Node)}
    masks = {
        k: position[same_values_base(node.args[0])] for k, node in enumerate(saved)
        if isinstance(node, fx.Node) and node.op == "call_function" and node.target in COMPARISONS
        and not node.kwargs and isinstance(node.args[0], fx.Node) and same_values_base(node.args[0]) in position
        and not any(isinstance(a, fx.Node) for a in node.args[1:])
    }
    masks = {k: j for k, j in masks.items() if j not in masks}
    if not masks:
        return graphs
    inputs = [n for n in backward.graph.nodes if n.op == "placeholder"][: graphs.num_saved]
    first_op = next(n for n in backward.graph.nodes if n.op != "placeholder")
    for k, j in sorted(masks.items()):
        node = saved[k]
        compared = node.args[0]
        with backward.graph.inserting_before(first_op):
            value = backward.graph.call_function(torch.ops.aten.reshape.default, (inputs[j], list(compared.meta["val"].shape)))
            value.meta = dict(compared.meta)
            mask = backward.graph.call_function(node.target, (value, *node.args[1:]))
        mask.meta = dict(inputs[k].meta)
        inputs[k].replace_all_uses_with(mask)
        backward.graph.erase_node(inputs[k])
    output.args = (tuple(results[: graphs.num_outputs]) + tuple(n for k, n in enumerate(saved) if k not in masks),)
    forward.graph.eliminate_dead_code()
    forward.recompile()
    backward.recompile()
    return SplitGraphs(forward, backward, graphs.num_outputs, graphs.num_saved - len(masks))


# Ops whose result depends on their input's strides, not only its shape and values.
_STRIDE_DEPENDENT = {
    torch.ops.aten.as_strided.default,
    torch.ops.aten.as_strided_scatter.default,
    torch.ops.aten._reshape_alias.default,
    torch.ops.aten.set_.source_Storage_storage_offset,
}
_VIEWS = {torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}


def accepting_any_strides(backward: fx.GraphModule) -> fx.GraphModule | None:
    """A copy of the backward graph that computes the same values from saved tensors of any
    strides (every view a reshape, which Inductor makes a view again where the layout allows),
    or None when the graph has an op whose result depends on strides.

    The forward graph may then hand over its saved values in the layout Inductor computed them
    in (channels-last around convolutions on CPU) instead of copying each into the traced
    layout; the backward's kernels then run in that layout too. Measured on the CIFAR-10 CNN at
    batch 256 (2 CPU cores): the NCHW pooling-backward kernels alone took 26 ms of a 157 ms step
    (channels-last: about 1 ms each); the whole step went to 105 ms.
    """
    if any(n.op == "call_function" and n.target in _STRIDE_DEPENDENT for n in backward.graph.nodes):
        return None
    free = copy.deepcopy(backward)
    for node in free.graph.nodes:
        if node.op == "call_function" and node.target in _VIEWS:
            node.target = torch.ops.aten.reshape.default
    free.recompile()
    return free


def donatable_saved(graphs: SplitGraphs) -> list[int]:
    """Positions of the saved values the backward may overwrite once read: values the forward
    computed that alias no forward input (parameters, the batch), no model output and no other
    saved value. AOTAutograd donates the same kind of values to its own backward.

    Aliasing is read from the graph (each op's schema says whether its result is a view), not
    from the nodes' example values: graph passes re-derive those, and views then no longer share
    their base's storage object."""
    nodes = graphs.forward.graph.nodes
    results = list(next(n for n in reversed(nodes) if n.op == "output").args[0])
    leaves, saved = results[: graphs.num_outputs], results[graphs.num_outputs :]
    bases = [_alias_base(n) if isinstance(n, fx.Node) else None for n in saved]
    taken = {_alias_base(n) for n in leaves if isinstance(n, fx.Node)}
    return [
        k for k, base in enumerate(bases)
        if base is not None and base.op == "call_function" and base not in taken and bases.count(base) == 1
    ]


def _alias_base(node: fx.Node) -> fx.Node | None:
    """The node whose fresh result ``node`` is a view of (``node`` itself if it is fresh), or None
    when that cannot be told (an op without a schema)."""
    while node.op == "call_function":
        target = node.target
        if target is operator.getitem:
            producer = node.args[0]
            if not isinstance(producer, fx.Node) or producer.op != "call_function":
                return None
            if not _returns_alias(producer.target):
                return node  # one fresh result of a multi-result op
            node = producer
            continue
        if not isinstance(target, torch._ops.OpOverload):
            return None
        if not _returns_alias(target):
            return node
        source = _aliased_argument(node, target)
        if source is None:
            return None
        node = source
    return node


def _aliased_argument(node: fx.Node, target: torch._ops.OpOverload) -> fx.Node | None:
    """The argument a view op's result aliases: the one whose schema alias set the result's
    shares (``_unsafe_view``: its input), or None when there is no single such node."""
    schema = target._schema
    if target.overloadpacket is torch.ops.aten._unsafe_view:
        wanted = {schema.arguments[0].name}
    else:
        sets = {s for r in schema.returns if r.alias_info is not None for s in r.alias_info.before_set}
        # a list of views (split, unbind) carries its alias set on the elements: the schema's
        # annotated argument is then the one
        wanted = {a.name for a in schema.arguments
                  if a.alias_info is not None and (not sets or set(a.alias_info.before_set) & sets)}
    found = []
    for position, argument in enumerate(schema.arguments):
        if argument.name not in wanted:
            continue
        value = node.args[position] if position < len(node.args) else node.kwargs.get(argument.name)
        found.append(value)
    if len(found) != 1 or not isinstance(found[0], fx.Node):
        return None
    return found[0]


def _returns_alias(target: object) -> bool:
    """Whether an op's result may share storage with an argument (schema alias annotations;
    ``_unsafe_view`` is a view that its schema does not declare)."""
    if not isinstance(target, torch._ops.OpOverload):
        return True
    if target.overloadpacket is torch.ops.aten._unsafe_view:
        return True
    return any(r.alias_info is not None for r in target._schema.returns)


def split_min_cut(private: PrivateGraph) -> SplitGraphs:
    """The min-cut rematerialization partition of the private graph."""
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    capture = private.capture
    joint = copy.deepcopy(private.graph_module)
    num_forward_inputs = capture.num_params + len(capture.buffers) + capture.num_batch
    placeholders = [n for n in joint.graph.nodes if n.op == "placeholder"]
    # The partitioner tells forward inputs from backward inputs by these names.
    for k, node in enumerate(placeholders):
        name = f"primals_{k + 1}" if k < num_forward_inputs else f"tangents_{k - num_forward_inputs + 1}"
        node.name = node.target = name
    joint.recompile()
    num_leaves = len(capture.output_is_differentiable)
    forward, backward = min_cut_rematerialization_partition(joint, None, num_fwd_outputs=num_leaves)
    backward_inputs = [n for n in backward.graph.nodes if n.op == "placeholder"]
    num_tangents = len(placeholders) - num_forward_inputs
    if [n.name for n in backward_inputs[len(backward_inputs) - num_tangents :]] != [
        f"tangents_{k + 1}" for k in range(num_tangents)
    ]:
        raise RuntimeError("unexpected backward input order from the partitioner")
    return SplitGraphs(forward, backward, num_leaves, len(backward_inputs) - num_tangents)


def split_saving_all(private: PrivateGraph) -> SplitGraphs:
    """Cut the private graph at the seeds, saving every forward value the backward reads."""
    gm = private.graph_module
    capture = private.capture
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    num_forward_inputs = capture.num_params + len(capture.buffers) + capture.num_batch
    forward_inputs = placeholders[:num_forward_inputs]
    backward_inputs = placeholders[num_forward_inputs:]  # seeds, mask, max_grad_norm
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    results = list(output_node.args[0])
    num_leaves = len(capture.output_is_differentiable)
    leaves, backward_results = results[:num_leaves], results[num_leaves:]

    in_backward: set[fx.Node] = set(backward_inputs)
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a in in_backward for a in node.all_input_nodes):
            in_backward.add(node)

    saved: list[fx.Node] = []
    seen: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node in in_backward and node.op != "placeholder":
            for arg in node.all_input_nodes:
                if arg not in in_backward and arg not in seen:
                    seen.add(arg)
                    saved.append(arg)
    for value in backward_results:
        if isinstance(value, fx.Node) and value not in in_backward and value not in seen:
            seen.add(value)  # a result that needs no seed (e.g. an unused mask) is saved as is
            saved.append(value)

    forward = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for node in forward_inputs:
        env[node] = forward.node_copy(node)
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output") or node in in_backward:
            continue
        env[node] = forward.node_copy(node, lambda n: env[n])
    forward.output(tuple(env[n] if isinstance(n, fx.Node) else n for n in leaves) + tuple(env[n] for n in saved))
    forward.eliminate_dead_code()

    backward = fx.Graph()
    benv: dict[fx.Node, fx.Node] = {}
    for k, node in enumerate(saved):
        new = backward.placeholder(f"saved_{k}")
        new.meta = dict(node.meta)
        benv[node] = new
    for node in backward_inputs:
        benv[node] = backward.node_copy(node)
    for node in gm.graph.nodes:
        if node.op == "call_function" and node in in_backward:
            benv[node] = backward.node_copy(node, lambda n: benv[n])
    backward.output(tuple(benv[n] if isinstance(n, fx.Node) else n for n in backward_results))
    backward.eliminate_dead_code()

    return SplitGraphs(
        forward=fx.GraphModule(gm, forward),
        backward=fx.GraphModule(gm, backward),
        num_outputs=num_leaves,
        num_saved=len(saved),
    )
