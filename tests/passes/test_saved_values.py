"""What the forward saves for the backward: shapes read from unfilled tensors, ReLU masks as bytes."""

import pytest
import torch
import torch.fx as fx
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from passes import analyze, capture, private_backward
from passes.partition import (
    SplitGraphs,
    accepting_any_strides,
    recompute_saved_masks,
    split,
    split_min_cut,
)
from passes.saved_values import (
    channels_last_masks_and_shapes,
    saved_masks_as_bytes,
    shape_only_reads,
)
from tests.passes.harness import forward_and_backward_inputs, saved_and_backward_inputs

D = torch.float64
aten = torch.ops.aten


def _saved(graphs: SplitGraphs) -> list[fx.Node]:
    return list(graphs.forward.graph.output_node().args[0])[graphs.num_outputs :]


def _run(cap, graphs: SplitGraphs) -> list[torch.Tensor]:
    saved, rest = saved_and_backward_inputs(cap, graphs)
    return graphs.backward(*saved, *rest)


def _private(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    cap = capture(model.to(D), [x.to(D)])
    return cap, private_backward(cap, analyze(cap))


def test_conv_relu_pool_saves_byte_masks_not_activations_with_identical_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )
    cap, private = _private(model, torch.randn(5, 3, 8, 8))
    before = recompute_saved_masks(split_min_cut(private))
    after = split(private)
    relu_shapes = {(5, 8, 8, 8), (5, 6, 4, 4), (5, 4, 2, 2)}
    floats = {tuple(n.meta["val"].shape) for n in _saved(before) if n.meta["val"].is_floating_point()}
    assert relu_shapes & floats  # min-cut alone saves ReLU outputs in full precision ...
    kept = [n.meta["val"] for n in _saved(after)]
    assert not relu_shapes & {tuple(v.shape) for v in kept if v.is_floating_point()}  # ... not after
    assert {tuple(v.shape) for v in kept if v.dtype == torch.uint8} >= {(5, 8, 8, 8)}
    assert all(v.dtype != torch.bool for v in kept)
    saved_bytes = [sum(n.meta["val"].nbytes for n in _saved(g)) for g in (before, after)]
    assert saved_bytes[1] < 0.6 * saved_bytes[0]
    for a, b in zip(_run(cap, before), _run(cap, after)):
        assert torch.equal(a, b)


def test_activation_read_by_the_next_layer_stays_saved():
    """A ReLU output that the next linear layer's weight gradient reads keeps its float copy."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    cap, private = _private(model, torch.randn(5, 6))
    graphs = split(private)
    assert not any(n.meta["val"].dtype == torch.uint8 for n in _saved(graphs))
    assert any(tuple(n.meta["val"].shape) == (5, 8) and n.meta["val"].dtype == D for n in _saved(graphs))


def test_pool_backward_reads_an_unfilled_tensor_for_the_shape():
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2))
    _, private = _private(model, torch.randn(4, 2, 4, 4))
    graphs = shape_only_reads(recompute_saved_masks(split_min_cut(private)))
    pool = next(n for n in graphs.backward.graph.nodes if n.target is aten.avg_pool2d_backward.default)
    assert pool.args[1].target is aten.empty_strided.default


def _mask_split(dtype: torch.dtype, compare, zero_when_true: bool) -> SplitGraphs:
    """A forward saving ``x`` and a backward ``where(compare(x, 0), 0, g)`` (or the branches swapped)."""

    def forward(x):
        return x.sum(), aten.alias.default(x)

    def backward(x, g):
        zero = aten.scalar_tensor.default(0, dtype=dtype)
        condition = compare(aten.alias.default(x), 0)
        return aten.where.self(condition, zero, g) if zero_when_true else aten.where.self(condition, g, zero)

    example = torch.zeros(4, 6, dtype=dtype)
    return SplitGraphs(make_fx(forward, tracing_mode="fake")(example),
                       make_fx(backward, tracing_mode="fake")(example, example.clone()), num_outputs=1, num_saved=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("compare", [aten.le.Scalar, aten.gt.Scalar, aten.eq.Scalar])
@pytest.mark.parametrize("zero_when_true", [True, False])
def test_byte_mask_gives_where_bits_exactly_nan_and_inf_included(dtype, compare, zero_when_true):
    plain = _mask_split(dtype, compare, zero_when_true)
    masked = saved_masks_as_bytes(plain)
    (stored,) = _saved(masked)
    assert stored.meta["val"].dtype == torch.uint8
    torch.manual_seed(0)
    x = torch.randn(4, 6, dtype=dtype)
    x[0, :3] = 0.0
    g = torch.randn(4, 6, dtype=dtype)
    g[1] = torch.tensor([float("inf"), float("-inf"), float("nan"), -0.0, 0.0, 1.0])
    g[2, :3] = float("nan")
    expected = plain.backward(x, g)
    _, byte_mask = masked.forward(x)
    assert byte_mask.dtype == torch.uint8
    got = masked.backward(byte_mask, g)
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[x.element_size()]
    assert torch.equal(got.view(bits), expected.view(bits))


def test_values_read_otherwise_or_broadcast_masks_are_left_alone():
    def backward_reading_twice(x, g):
        zero = aten.scalar_tensor.default(0, dtype=D)
        return aten.where.self(aten.le.Scalar(x, 0), zero, g) + x

    def broadcast_where(x, g):
        zero = aten.scalar_tensor.default(0, dtype=D)
        return aten.where.self(aten.le.Scalar(x, 0), zero, g)

    forward = make_fx(lambda x: (x.sum(), aten.alias.default(x)), tracing_mode="fake")(torch.zeros(4, 6, dtype=D))
    for backward, shapes in ((backward_reading_twice, ((4, 6), (4, 6))), (broadcast_where, ((4, 6), (3, 4, 6)))):
        traced = make_fx(backward, tracing_mode="fake")(*(torch.zeros(s, dtype=D) for s in shapes))
        graphs = SplitGraphs(forward, traced, num_outputs=1, num_saved=1)
        assert saved_masks_as_bytes(graphs) is graphs


def test_channels_last_masks_and_shapes_keeps_values_and_stores_them_channels_last():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 2))
    cap, private = _private(model, torch.randn(5, 3, 4, 4))
    graphs = split(private)
    relaid = channels_last_masks_and_shapes(graphs)
    forward_inputs, rest = forward_and_backward_inputs(cap)
    plain, permuted = graphs.forward(*forward_inputs), relaid.forward(*forward_inputs)
    masks = [(a, b) for a, b in zip(plain, permuted) if a.dtype == torch.uint8]
    assert masks
    for a, b in masks:
        assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
    any_strides = accepting_any_strides(relaid.backward)  # as lower_split runs it
    got = any_strides(*permuted[relaid.num_outputs :], *rest)
    for a, b in zip(_run(cap, graphs), got):
        assert torch.equal(a, b)
    unfilled = [n for n in relaid.backward.graph.nodes if n.target is aten.empty_strided.default]
    assert unfilled and all(n.meta["val"].is_contiguous(memory_format=torch.channels_last) for n in unfilled)


def test_channels_last_leaves_a_split_without_masks_or_shapes_alone():
    """A saved uint8 image batch is the model's, not a mask of these passes: not copied."""
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    forward = make_fx(lambda x: (x.double().sum(), aten.alias.default(x)), tracing_mode="fake")(images)
    backward = make_fx(lambda x, g: x.double() * g, tracing_mode="fake")(images, torch.zeros(2, 3, 4, 4, dtype=D))
    graphs = SplitGraphs(forward, backward, num_outputs=1, num_saved=1)
    assert channels_last_masks_and_shapes(graphs) is graphs
