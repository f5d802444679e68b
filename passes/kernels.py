"""kernels: ops the lowering hands to eager kernels because Inductor's code for them is slower.

Inductor decomposes ``embedding_dense_backward`` (the gradient of an embedding table, and the
clipped sum of its per-sample gradients) into an ``index_put`` with accumulation, which its CPU
backend compiles to an atomic add per element: 5.5 ms for (256·64) rows of 100 into a
10,000-row table on 2 cores, against 0.6 ms for ``index_add_`` and 1.7 ms for eager
``embedding_dense_backward`` (which sorts the indices first). On CPU the row sum therefore runs
as an opaque op; on other devices it stays the aten op.
"""

from __future__ import annotations

import copy

import torch
import torch.fx as fx

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


def with_eager_row_sums(graph_module: fx.GraphModule) -> fx.GraphModule:
    """The same graph with embedding gradients on CPU summed by an eager kernel, not atomics."""

    def replaced(node: fx.Node) -> bool:
        if node.target is not aten.embedding_dense_backward.default:
            return False
        grad, _, _, _, scale_grad_by_freq = node.args
        val = grad.meta.get("val") if isinstance(grad, fx.Node) else None
        return not scale_grad_by_freq and isinstance(val, torch.Tensor) and val.device.type == "cpu"

    if not any(replaced(n) for n in graph_module.graph.nodes):
        return graph_module
    graph = copy.deepcopy(graph_module.graph)
    for node in graph.nodes:
        if replaced(node):
            grad, indices, num_weights, padding_idx, _ = node.args
            node.target = torch.ops.dpcompile.embedding_rows_sum.default
            node.args = (grad, indices, num_weights, padding_idx)
    return fx.GraphModule(graph_module, graph)
