"""The forward/backward split, and the backward that accepts saved values of any strides."""

import operator

import torch
import torch.fx as fx
from torch import nn

from passes import analyze, capture, private_backward
from passes.lower import lower_split
from passes.partition import (
    SplitGraphs,
    accepting_any_strides,
    donatable_saved,
    split,
    split_min_cut,
)
from tests.passes.harness import saved_and_backward_inputs

D = torch.float64


def _split_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(6, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).to(D)
    cap = capture(model, [torch.randn(5, 3, 8, 8, dtype=D)])
    graphs = split(private_backward(cap, analyze(cap)))
    return (graphs, *saved_and_backward_inputs(cap, graphs))


def test_backward_accepting_any_strides_gives_the_same_values():
    graphs, saved, rest = _split_cnn()
    expected = graphs.backward(*saved, *rest)
    free = accepting_any_strides(graphs.backward)
    assert free is not None
    # Saved 4-D activations handed over channels-last, as Inductor computes them around convs.
    relaid = [s.contiguous(memory_format=torch.channels_last) if s.dim() == 4 else s for s in saved]
    assert any(not s.is_contiguous() for s in relaid)
    got = free(*relaid, *rest)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)
    # the original graph's views refuse that layout: the pass is what makes it work
    views = [n for n in graphs.backward.graph.nodes if n.target is torch.ops.aten.view.default]
    assert views and not any(n.target is torch.ops.aten.view.default for n in free.graph.nodes)


def test_backward_reading_strides_is_left_alone():
    graphs, _, _ = _split_cnn()
    graph = fx.Graph()
    x = graph.placeholder("saved_0")
    graph.output(graph.call_function(torch.ops.aten.as_strided.default, (x, [2, 2], [1, 2])))
    assert accepting_any_strides(fx.GraphModule(graphs.backward, graph)) is None


def test_relu_masks_are_recomputed_in_the_backward_not_saved():
    torch.manual_seed(0)
    model = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).to(D)
    x = torch.randn(5, 4, 8, dtype=D)
    cap = capture(model, [x])
    private = private_backward(cap, analyze(cap))
    plain, recomputed = split_min_cut(private), split(private)
    saved_dtypes = [n.meta["val"].dtype for n in _outputs(plain.forward)[plain.num_outputs :]]
    assert torch.bool in saved_dtypes  # the partitioner saves the feed-forward ReLU's mask ...
    kept = _outputs(recomputed.forward)[recomputed.num_outputs :]
    assert all(n.meta["val"].dtype != torch.bool for n in kept)  # ... and the pass does not
    assert recomputed.num_saved == len(kept) < plain.num_saved
    results = []
    for graphs in (plain, recomputed):
        saved, rest = saved_and_backward_inputs(cap, graphs)
        results.append(graphs.backward(*saved, *rest))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _outputs(graph_module: fx.GraphModule) -> list[fx.Node]:
    return list(next(n for n in graph_module.graph.nodes if n.op == "output").args[0])


def test_saved_values_keep_the_compute_layout_only_for_convolution_nets_under_inductor():
    graphs, _, _ = _split_cnn()
    assert lower_split(graphs, "inductor")[2]
    assert not lower_split(graphs, "eager")[2]
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2)).to(D)
    cap = capture(mlp, [torch.randn(3, 4, dtype=D)])
    assert not lower_split(split(private_backward(cap, analyze(cap))), "inductor")[2]


def test_donatable_saved_values_are_the_forwards_own_intermediates():
    """Parameters, the batch and model outputs are never donated; nor two views of one buffer."""
    graphs, _, _ = _split_cnn()
    results = _outputs(graphs.forward)
    saved = results[graphs.num_outputs :]
    donated = donatable_saved(graphs)
    assert donated  # the first ReLU's mask and the conv activations
    assert [saved[k].name for k in donated] == ["relu_keep", "avg_pool2d", "view"]
    # not donated: the second conv's weight, the linear weight transposed back (a view of a
    # parameter) and the input viewed as one image of 15 channels (for the grouped backward)
    kept = [saved[k].name for k in range(len(saved)) if k not in donated]
    assert kept == ["primals_3", "permute_1", "view_3"]

    # A saved value that is also a model output, or shares its storage with another saved value.
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(torch.ops.aten.mul.Tensor, (x, 2.0))
    z = graph.call_function(torch.ops.aten.relu.default, (x,))
    z_view = graph.call_function(torch.ops.aten.view.default, (z, [-1]))
    x_view = graph.call_function(torch.ops.aten.view.default, (x, [-1]))
    w = graph.call_function(torch.ops.aten.sin.default, (x,))
    x_part = graph.call_function(operator.getitem, (graph.call_function(torch.ops.aten.split.Tensor, (x, 1)), 0))
    graph.output((y, y, z, z_view, x_view, w, x_part))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    split_graphs = SplitGraphs(gm, gm, num_outputs=1, num_saved=6)
    assert donatable_saved(split_graphs) == [4]  # only `w`: the others alias y, x or each other


def test_compiled_backward_writes_only_into_donated_saved_values():
    """Under Inductor the backward may reuse saved activations in place (the conv net's output
    gradients do), never the parameters or the batch, and computes the eager backward's values."""
    torch.manual_seed(0)
    # first layer with windows (2·9) narrower than its 24 output channels: per-sample gradients
    # from unfolded windows, so its output gradient stays channels-last like the saved tanh output
    # (a tanh: a ReLU before a pool saves a byte mask, which no float gradient can be written into)
    model = nn.Sequential(nn.Conv2d(2, 24, 3, padding=1), nn.Tanh(), nn.AvgPool2d(2),
                          nn.Conv2d(24, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 16, 3)).to(D)
    cap = capture(model, [torch.randn(5, 2, 8, 8, dtype=D)])
    graphs = split(private_backward(cap, analyze(cap)))
    _, rest = saved_and_backward_inputs(cap, graphs)
    forward, backward, _ = lower_split(graphs, "inductor")
    cap_inputs = [n for n in graphs.forward.graph.nodes if n.op == "placeholder"]
    torch.manual_seed(0)
    inputs = [torch.randn(n.meta["val"].shape, dtype=D) for n in cap_inputs]
    originals = [t.clone() for t in inputs]
    results = forward(*inputs)
    saved = list(results[graphs.num_outputs :])
    copies = [s.clone() for s in saved]
    expected = accepting_any_strides(graphs.backward)(*copies, *rest)  # saved channels-last
    got = backward([*saved, *rest])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    for t, original in zip(inputs, originals):  # parameters and batch untouched
        assert torch.equal(t, original)
    donated = set(donatable_saved(graphs))
    changed = {k for k, (s, c) in enumerate(zip(saved, copies)) if not torch.equal(s, c)}
    assert changed and changed <= donated
