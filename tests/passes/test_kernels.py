"""Eager row sums for embedding gradients under Inductor on CPU."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from passes.kernels import embedding_rows_sum, with_eager_row_sums

aten = torch.ops.aten


@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
def test_row_sum_equals_embedding_dense_backward(padding_idx):
    torch.manual_seed(0)
    grad = torch.randn(4, 7, 5, dtype=torch.float64)
    indices = torch.randint(0, 6, (4, 7))  # repeats, and the padding row
    expected = aten.embedding_dense_backward(grad, indices, 9, padding_idx, False)
    torch.testing.assert_close(embedding_rows_sum(grad, indices, 9, padding_idx), expected, rtol=0, atol=1e-13)


def test_lowering_replaces_only_unscaled_cpu_row_sums():
    def f(grad, indices):
        return (aten.embedding_dense_backward(grad, indices, 9, -1, False),
                aten.embedding_dense_backward(grad, indices, 9, -1, True))

    grad, indices = torch.randn(4, 7, 5), torch.randint(0, 9, (4, 7))
    gm = make_fx(f)(grad, indices)
    lowered = with_eager_row_sums(gm)
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dpcompile.embedding_rows_sum.default) == 1
    assert targets.count(aten.embedding_dense_backward.default) == 1  # scale_grad_by_freq kept
    for got, expected in zip(lowered(grad, indices), f(grad, indices)):
        torch.testing.assert_close(got, expected)
    # the input graph is left as it was
    assert sum(n.target is aten.embedding_dense_backward.default for n in gm.graph.nodes) == 2
