"""kernels: what the Inductor lowering changes about how ops run, each change measured faster.

- RNN scans (``passes/rnn.py``) compile each time step's pointwise math into one kernel
  (:func:`with_fused_cells`) instead of running ~10 small eager kernels per step.
- Embedding gradients on CPU run as an eager row sum (:func:`with_eager_row_sums`): Inductor
  decomposes ``embedding_dense_backward`` (an embedding table's gradient, and the clipped sum of
  its per-sample gradients) into an accumulating ``index_put``, which its CPU backend compiles to
  an atomic add per element: 5.5 ms for (256·64) rows of 100 into a 10,000-row table on 2 cores,
  against 0.6 ms for ``index_add_`` and 1.7 ms for eager ``embedding_dense_backward`` (which
  sorts the indices first). Other devices keep the aten op.
- Max-pooling gradients run the aten kernel (:func:`with_eager_max_pool_backward`), on every
  device. This one is a correctness change: Inductor decomposes
  ``max_pool2d_with_indices_backward`` into a scatter-add into a zero-filled buffer, and torch
  2.13's scheduler fused a kernel reading that buffer with its zero fill, before the scatter. It
  struck the low-memory graph of the MNIST CNN (two pooling gradients from the same indices,
  channels-last saved values): the convolutions' clipped sums came out as zeros.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.fx as fx

import passes.rnn  # noqa: F401  (defines the dpcompile::rnn_scan ops marked below)

aten = torch.ops.aten


@torch.library.custom_op("dpcompile::embedding_rows_sum", mutates_args=())
def embedding_rows_sum(grad: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int) -> torch.Tensor:
    """``embedding_dense_backward`` without frequency scaling: row ``v`` of the result is the sum of
    the rows of ``grad`` whose index is ``v`` (never ``padding_idx``)."""
    if grad.device.type != "cpu":
        return aten.embedding_dense_backward(grad, indices, num_weights, padding_idx, False)
    width = grad.shape[-1]
    rows = grad.reshape(-1, width)
    flat = indices.reshape(-1)
    if padding_idx >= 0:
        keep = flat != padding_idx
        rows, flat = rows[keep], flat[keep]
    # CPU index_add_ accumulates in index order: deterministic, like the aten op.
    return rows.new_zeros(num_weights, width).index_add_(0, flat, rows)


@embedding_rows_sum.register_fake
def _(grad, indices, num_weights, padding_idx):
    return grad.new_empty(num_weights, grad.shape[-1])


@torch.library.custom_op("dpcompile::max_pool2d_backward", mutates_args=())
def max_pool2d_backward(grad: torch.Tensor, x: torch.Tensor, kernel_size: list[int], stride: list[int],
                        padding: list[int], dilation: list[int], ceil_mode: bool,
                        indices: torch.Tensor) -> torch.Tensor:
    """``max_pool2d_with_indices_backward``, opaque to Inductor (see the module docstring)."""
    return aten.max_pool2d_with_indices_backward(grad, x, kernel_size, stride, padding, dilation,
                                                 ceil_mode, indices)


@max_pool2d_backward.register_fake
def _(grad, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    return torch.empty_like(x)


def with_eager_max_pool_backward(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The same graph with max-pooling gradients computed by the aten kernel, not Inductor's
    scatter decomposition."""

    def opaque(node: fx.Node) -> None:
        node.target = torch.ops.dpcompile.max_pool2d_backward.default

    return _edited_copy(graph_module, lambda n: n.target is aten.max_pool2d_with_indices_backward.default, opaque)


def with_fused_cells(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The same graph with its recurrence scans running each step's pointwise math compiled."""
    scans = (torch.ops.dpcompile.rnn_scan.default, torch.ops.dpcompile.rnn_scan_backward.default)

    def fuse(node: fx.Node) -> None:
        position = [a.name for a in node.target._schema.arguments].index("fused")  # type: ignore[union-attr]
        if len(node.args) > position:
            node.update_arg(position, True)
        else:
            node.update_kwarg("fused", True)

    return _edited_copy(graph_module, lambda n: n.target in scans, fuse)


def with_eager_row_sums(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The same graph with embedding gradients on CPU summed by an eager kernel, not atomics."""

    def unscaled_on_cpu(node: fx.Node) -> bool:
        if node.target is not aten.embedding_dense_backward.default:
            return False
        grad, _, _, _, scale_grad_by_freq = node.args
        val = grad.meta.get("val") if isinstance(grad, fx.Node) else None
        return not scale_grad_by_freq and isinstance(val, torch.Tensor) and val.device.type == "cpu"

    def row_sum(node: fx.Node) -> None:
        grad, indices, num_weights, padding_idx, _ = node.args
        node.target = torch.ops.dpcompile.embedding_rows_sum.default
        node.args = (grad, indices, num_weights, padding_idx)

    return _edited_copy(graph_module, unscaled_on_cpu, row_sum)


def for_inductor(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The graph with every substitution above that applies (each copies only when it matches)."""
    return with_eager_max_pool_backward(with_eager_row_sums(with_fused_cells(graph_module)))


def _edited_copy(graph_module: fx.GraphModule, selected: Callable[[fx.Node], bool],
                 edit: Callable[[fx.Node], None]) -> fx.GraphModule:
    """``graph_module`` itself when no node is selected, else a copy with ``edit`` applied to each
    selected node (the input graph is left as it was)."""
    if not any(selected(n) for n in graph_module.graph.nodes):
        return graph_module
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        if selected(node):
            edit(node)
    return fx.GraphModule(graph_module, graph)
