"""merge_duplicates: identical pure computations are done once, and nothing else changes."""

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from passes.simplify import merge_duplicates

aten = torch.ops.aten


def _count(gm: fx.GraphModule, target) -> int:
    return sum(1 for n in gm.graph.nodes if n.target is target)


def test_views_spelled_differently_share_one_gram():
    def f(g):
        a = aten.view(g, [-1, 8])
        b = aten.view(g, [6, 8])
        return torch.bmm(a.view(2, 3, 8), a.view(2, 3, 8).transpose(1, 2)).sum() + \
            torch.bmm(b.view(2, 3, 8), b.view(2, 3, 8).transpose(1, 2)).sum()

    g = torch.randn(2, 3, 8)
    gm = make_fx(f)(g)
    assert _count(gm, aten.bmm.default) == 2
    merged = merge_duplicates(gm)
    assert _count(merged, aten.bmm.default) == 1
    torch.testing.assert_close(merged(g), f(g))


def test_random_ops_are_not_merged():
    def f(x):
        return torch.rand_like(x) + torch.rand_like(x)

    gm = merge_duplicates(make_fx(f)(torch.zeros(4)))
    assert _count(gm, aten.rand_like.default) == 2
    out = gm(torch.zeros(1000))
    assert not torch.allclose(out, 2 * out[:1].expand(1000))


def test_scalar_arguments_compare_by_type_and_sign():
    def f(x):
        return aten.mul(x, 0.0), aten.mul(x, -0.0), aten.add(x, 1), aten.add(x, 1.0)

    gm = merge_duplicates(make_fx(f)(torch.ones(3)))
    assert _count(gm, aten.mul.Tensor) == 2
    assert _count(gm, aten.add.Tensor) == 2
    zero, negative_zero, _, _ = gm(-torch.ones(3))
    assert torch.equal(torch.signbit(zero), torch.ones(3, dtype=torch.bool))
    assert torch.equal(torch.signbit(negative_zero), torch.zeros(3, dtype=torch.bool))


def test_merged_outputs_stay_distinct_tensors():
    """Two gradients computed identically must not come back as one tensor: the optimizer adds
    noise to each in place."""

    def f(x):
        return x.sum(0), x.sum(0)

    gm = merge_duplicates(make_fx(f)(torch.randn(3, 2)))
    assert _count(gm, aten.sum.dim_IntList) == 1
    first, second = gm(torch.randn(3, 2))
    torch.testing.assert_close(first, second)
    first.add_(1.0)
    assert not torch.allclose(first, second)
