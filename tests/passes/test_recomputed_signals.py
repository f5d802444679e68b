"""Clipped sums that recompute a large backward signal from a smaller one instead of holding it.

An FFN's hidden gradient ``act'(h) ⊙ (g @ W2)`` is 4× its output gradient ``g``. The clipped
sum of the first layer's weight needs it once the clip factors exist; the rewrite scales ``g``
and recomputes the hidden gradient from it then, so that only ``g`` (held anyway for the second
layer's clipped sum) is kept alive across the norms.
"""

import pytest
import torch
from torch import nn

from passes import analyze, capture, private_backward
from passes.rewrite import _computed_from
from tests.passes.harness import assert_matches_reference, sum_loss

D = torch.float64
aten = torch.ops.aten


def ffn(activation: nn.Module, d: int = 8, hidden: int = 32) -> nn.Module:
    return nn.Sequential(nn.Linear(d, hidden), activation, nn.Linear(hidden, d)).to(D)


# Backward signals linear, along one path, in the output gradient. (LeakyReLU's gradient sums
# two branches of it, `where(h > 0, g, slope·g)`: held, not recomputed; exact either way, below.)
ACTIVATIONS = [nn.ReLU(), nn.GELU(), nn.Tanh(), nn.Sigmoid(), nn.SiLU(), nn.Hardtanh()]


def _signals_held_across_norms(private, numel: int) -> list[str]:
    """Values computed from the seeds before the norms' square root, of ``numel`` elements, that
    are read after it (held until the clip factors exist)."""
    graph = private.graph_module.graph
    nodes = list(graph.nodes)
    position = {n: k for k, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    seeds = placeholders[len(placeholders) - 2 - private.capture.num_outputs : len(placeholders) - 2]
    from_seeds = _computed_from(list(seeds))
    boundary = next(k for k, n in enumerate(nodes) if n.target is aten.sqrt.default)
    return [
        n.name for n in nodes[:boundary]
        if n in from_seeds and isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].numel() == numel
        and any(position[u] > boundary for u in n.users)
    ]


def _count(graph_module, target) -> int:
    return sum(1 for n in graph_module.graph.nodes if n.target is target)


@pytest.mark.parametrize("activation", ACTIVATIONS, ids=lambda a: type(a).__name__)
@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_hidden_gradient_is_exact_and_not_held(activation, clipping):
    torch.manual_seed(0)
    batch, length, d, hidden = 4, 6, 8, 32
    model = ffn(activation, d, hidden)
    x = torch.randn(batch, length, d, dtype=D)
    assert_matches_reference(model, x, clipping=clipping)

    cap = capture(model, (x,), sum_loss)
    private = private_backward(cap, analyze(cap), clipping)
    assert _signals_held_across_norms(private, batch * length * hidden) == []
    # one more product than the captured backward: the hidden gradient, recomputed
    assert _count(private.graph_module, aten.mm.default) == _count(cap.graph_module, aten.mm.default) + 1


def test_recompute_goes_through_one_product_at_most():
    """784-512-512-10-like: the first hidden gradient is the second's size, two products away
    from the 10-wide output gradient; only the second hidden gradient is recomputed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4)).to(D)
    x = torch.randn(6, 12, dtype=D)
    assert_matches_reference(model, x)
    cap = capture(model, (x,), sum_loss)
    private = private_backward(cap, analyze(cap))
    assert _count(private.graph_module, aten.mm.default) == _count(cap.graph_module, aten.mm.default) + 1


def test_signal_no_smaller_upstream_is_held_not_recomputed():
    """A hidden gradient no more than twice its upstream's size is scaled where it is."""
    torch.manual_seed(0)
    model = ffn(nn.ReLU(), d=8, hidden=12)
    x = torch.randn(4, 6, 8, dtype=D)
    cap = capture(model, (x,), sum_loss)
    private = private_backward(cap, analyze(cap))
    assert _count(private.graph_module, aten.mm.default) == _count(cap.graph_module, aten.mm.default)


@pytest.mark.parametrize("activation", [nn.ReLU(), nn.LeakyReLU(0.1)], ids=lambda a: type(a).__name__)
def test_masked_samples_stay_exact(activation):
    torch.manual_seed(0)
    model = ffn(activation)
    x = torch.randn(5, 3, 8, dtype=D)
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=D)
    assert_matches_reference(model, x, mask=mask)
