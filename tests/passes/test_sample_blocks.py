"""A first convolution's output gradient made a block of samples at a time (passes.sample_blocks)."""

import pytest
import torch
from torch import nn

import passes.grad_forms as grad_forms
import passes.sample_blocks as sample_blocks
from passes import analyze, capture, private_backward
from passes.partition import recompute_saved_masks, split, split_min_cut
from passes.rewrite import _computed_from
from passes.saved_values import saved_masks_as_bytes, shape_only_reads
from tests.passes.harness import saved_and_backward_inputs

D = torch.float64
aten = torch.ops.aten
WINDOW_CALL = torch.ops.dpcompile.conv_window_grads.default


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 2 samples at the test's sizes: 2 samples of windows per block of the window call,
    2 samples of output gradient (32 channels, 8×8, float64) per recomputed block."""
    monkeypatch.setattr(grad_forms, "CONV_WINDOW_BLOCK_BYTES_CPU", 2 * 3 * 9 * 64 * 8)
    monkeypatch.setattr(sample_blocks, "CONV_GRAD_BLOCK_BYTES_CPU", 2 * 32 * 64 * 8)


def _split_both_ways(model: nn.Module, x: torch.Tensor):
    torch.manual_seed(0)
    cap = capture(model.to(D), [x.to(D)])
    private = private_backward(cap, analyze(cap))
    whole = saved_masks_as_bytes(shape_only_reads(recompute_saved_masks(split_min_cut(private))))
    return cap, whole, split(private)


def _run(cap, graphs) -> list[torch.Tensor]:
    saved, rest = saved_and_backward_inputs(cap, graphs)
    return graphs.backward(*saved, *rest)


def _whole_selects(graphs, shape: tuple[int, ...]) -> list[str]:
    """Selects computed from the seeds (backward signals) of ``shape``."""
    placeholders = [n for n in graphs.backward.graph.nodes if n.op == "placeholder"]
    from_seeds = _computed_from(placeholders[graphs.num_saved:-2])
    return [n.name for n in from_seeds if n.target is aten.where.self and tuple(n.meta["val"].shape) == shape]


def _calls(graphs) -> list:
    return [n for n in graphs.backward.graph.nodes if n.target is WINDOW_CALL]


def cnn(pool: nn.Module) -> nn.Module:
    # first layer: windows (3·3·3 = 27) no wider than its 32 output channels, so the window call
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), pool,
        nn.Conv2d(32, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
    )


@pytest.mark.parametrize("pool", [nn.AvgPool2d(2), nn.MaxPool2d(2)], ids=["avg", "max"])
def test_first_layer_gradient_in_blocks_gives_the_same_results(small_blocks, pool):
    batch = 7  # blocks of 2, 2, 2 and 1 sample
    cap, whole, blocked = _split_both_ways(cnn(pool), torch.randn(batch, 3, 8, 8))
    assert len(_calls(whole)) == 1 and len(_calls(blocked)) == 4
    assert [int(c.meta["val"].shape[0]) for c in _calls(blocked)] == [2, 2, 2, 1]
    # the first layer's output gradient (the ReLU's backward, a select) never exists whole
    assert _whole_selects(whole, (batch, 32, 8, 8)) and not _whole_selects(blocked, (batch, 32, 8, 8))
    for a, b in zip(_run(cap, whole), _run(cap, blocked)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("after", [nn.Identity(), nn.GroupNorm(4, 32)], ids=["relu", "groupnorm"])
def test_a_gradient_made_from_values_its_size_stays_whole(small_blocks, after):
    """Blocks keep what they are sliced from live until the last one. Where that is as large as
    the gradient (the next layer's input gradient, with no pool between; a GroupNorm's input and
    output gradient) the gradient is made whole, as before."""
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), after, nn.ReLU(), nn.Conv2d(32, 8, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    cap, whole, blocked = _split_both_ways(model, torch.randn(7, 3, 8, 8))
    assert len(_calls(whole)) == len(_calls(blocked)) == 1
    for a, b in zip(_run(cap, whole), _run(cap, blocked)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_gradient_the_input_gradient_reads_stays_whole(small_blocks):
    """A windowed convolution after another layer: its output gradient also makes its input's
    gradient, so it is computed whole and its window call is left as it was."""
    model = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 16, 1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2))
    cap, whole, blocked = _split_both_ways(model, torch.randn(6, 3, 8, 8))
    windowed = [c for c in _calls(whole) if tuple(c.args[2]) == (16, 3, 1, 1)]
    assert len(windowed) == 1
    assert [c for c in _calls(blocked) if tuple(c.args[2]) == (16, 3, 1, 1)][0].meta["val"].shape[0] == 6
    for a, b in zip(_run(cap, whole), _run(cap, blocked)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_blocks_no_smaller_than_the_batch_leave_the_graph_alone():
    cap, whole, blocked = _split_both_ways(cnn(nn.AvgPool2d(2)), torch.randn(5, 3, 8, 8))
    assert len(_calls(blocked)) == len(_calls(whole)) == 1


def test_only_deterministic_functional_per_sample_ops_are_recomputed():
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(g, mask, bias):
        drawn = torch.bernoulli(torch.sigmoid(g))  # a random draw: made once, then sliced
        return torch.where(mask, 0.0, g * drawn) + bias  # pointwise, bias broadcast over samples

    gm = make_fx(f, tracing_mode="fake")(torch.randn(6, 4, 3), torch.rand(6, 4, 3) > 0.5, torch.randn(4, 3))
    verdicts = {n.target: sample_blocks._per_sample(n, 6) for n in gm.graph.nodes if n.op == "call_function"}
    assert verdicts[aten.bernoulli.default] is False
    assert verdicts[aten.where.self] is True and verdicts[aten.add.Tensor] is True
    assert verdicts[aten.sigmoid.default] is True
