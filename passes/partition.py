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
:func:`split_saving_all` is the plain cut, kept as a fallback.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.rewrite import PrivateGraph


@dataclass
class SplitGraphs:
    forward: fx.GraphModule
    backward: fx.GraphModule
    num_outputs: int  # model output leaves returned by the forward before the saved values
    num_saved: int


def split(private: PrivateGraph) -> SplitGraphs:
    """Cut the private graph at the seeds, recomputing cheap forward values in the backward."""
    try:
        return split_min_cut(private)
    except Exception:  # the partitioner is a private torch API: never fail a compile on it
        return split_saving_all(private)


# Ops whose result depends on their input's strides, not only its shape and values.
_STRIDE_DEPENDENT = {
    torch.ops.aten.as_strided.default,
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
