"""The two ways to get a convolution's per-sample weight gradients agree with autograd."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from passes import grad_forms
from passes.grad_forms import Convolution
from passes.per_sample_rules import conv_outer
from passes.sample_dims import SampleDim
from tests.passes.harness import assert_matches_reference

D = torch.float64


@given(
    dims=st.sampled_from([1, 2, 3]),
    transposed=st.booleans(),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    frames=st.sampled_from([(1, 1), (2, 1), (1, 3)]),
    output_padding=st.integers(0, 1),
)
def test_grouped_backward_unfold_and_position_grams_agree_with_autograd(dims, transposed, groups, kernel, stride,
                                                                        padding, dilation, frames, output_padding):
    torch.manual_seed(dims + 3 * kernel)
    batch, outer, inner = 3, *frames
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    extra = {}
    if transposed:
        conv_cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
        extra["output_padding"] = output_padding if output_padding < max(stride, dilation) else 0
    conv = conv_cls(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=False, **extra).to(D)
    n = outer * batch * inner
    x = torch.randn(n, 2, *([5] * dims), dtype=D)
    y = conv(x)
    grad = torch.randn_like(y)
    # reference: per sample b, the frames (o, b, i) summed
    frame_of = torch.arange(n).reshape(outer, batch, inner)
    expected = []
    for b in range(batch):
        rows = frame_of[:, b, :].reshape(-1)
        out = conv(x[rows])
        (g,) = torch.autograd.grad(out, conv.weight, grad[rows])
        expected.append(g)
    expected = torch.stack(expected)
    output_padding = conv.output_padding if transposed else (0,) * dims
    form = Convolution(x, grad, tuple(conv.weight.shape), conv.stride, conv.padding, conv.dilation,
                       transposed, tuple(output_padding), groups, SampleDim(0, outer, inner), batch,
                       tuple(conv.weight.shape))
    torch.testing.assert_close(form.materialize(), expected)
    torch.testing.assert_close(conv_outer(form).materialize(), expected)
    norms = expected.flatten(1).pow(2).sum(1)
    torch.testing.assert_close(conv_outer(form).sq_norm(), norms)
    torch.testing.assert_close(form.position_gram_sq_norm(), norms)


class Frames(nn.Module):
    """A video model: frames folded into the batch dimension of a convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):  # (B, T, C, H, W)
        b, t = x.shape[:2]
        h = self.conv(x.flatten(0, 1)).mean((2, 3))  # (B·T, 3)
        return self.head(h.view(b, t, 3).mean(1))


def test_frames_folded_into_the_batch():
    torch.manual_seed(0)
    assert_matches_reference(Frames().to(D), torch.randn(3, 4, 2, 6, 6, dtype=D))


@pytest.mark.parametrize("frames", [(1, 1), (2, 1), (1, 3)])
@pytest.mark.parametrize("channels", [(3, 4), (2, 24)], ids=["grouped", "unfolded"])
def test_materialized_in_sample_blocks(monkeypatch, frames, channels):
    """On CPU per-sample gradients are made a few samples at a time and join to the whole: the
    grouped backward-weight kernel one call per block, unfolded windows (when they are narrower
    than the output channels) a block at a time inside one call."""
    torch.manual_seed(1)
    batch, (outer, inner), (c_in, c_out) = 5, frames, channels
    window_bytes = outer * inner * c_in * 9 * 36 * 8  # one sample's windows, float64
    monkeypatch.setattr(grad_forms, "CONV_SAMPLES_PER_CALL_CPU", 2)
    monkeypatch.setattr(grad_forms, "CONV_ONE_CALL_BYTES_CPU", 0)
    monkeypatch.setattr(grad_forms, "CONV_WINDOW_BLOCK_BYTES_CPU", 2 * window_bytes + 1)
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False).to(D)
    x = torch.randn(outer * batch * inner, c_in, 6, 6, dtype=D)
    grad = torch.randn(outer * batch * inner, c_out, 6, 6, dtype=D)
    form = Convolution(x, grad, tuple(conv.weight.shape), (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                       SampleDim(0, outer, inner), batch, tuple(conv.weight.shape))
    assert form.unfolds_windows == (c_in * 9 <= c_out)
    blocks = form.materialize_chunks()
    if form.unfolds_windows:
        assert form.window_block_samples == 2 and [b.shape[0] for b in blocks] == [5]
    else:
        assert [b.shape[0] for b in blocks] == [2, 2, 1]
    frame_of = torch.arange(outer * batch * inner).reshape(outer, batch, inner)
    expected = torch.stack([
        torch.autograd.grad(conv(x[frame_of[:, b].reshape(-1)]), conv.weight,
                            grad[frame_of[:, b].reshape(-1)])[0]
        for b in range(batch)
    ])
    torch.testing.assert_close(torch.cat(blocks), expected)


@pytest.mark.parametrize("layer", [
    nn.Conv2d(3, 32, 3, padding=1),  # windows of 27 ≤ 32 output channels: unfolded
    nn.Conv2d(8, 16, 1),  # a 1×1 kernel: the windows are the input
    nn.Conv2d(4, 8, 3, padding=1),  # windows of 36 > 8: the grouped kernel
], ids=["few-input-channels", "1x1", "grouped"])
def test_first_layer_per_sample_gradients_match_the_reference(layer):
    """A CIFAR-style first layer: per-sample gradients, norms and clipped sums exact either way."""
    torch.manual_seed(3)
    model = nn.Sequential(layer, nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.LazyLinear(3)).to(D)
    x = torch.randn(5, layer.in_channels, 6, 6, dtype=D)
    model(x)  # materialize the lazy head
    compiled = assert_matches_reference(model, x)
    plan = compiled.plans()["0.weight"]
    assert plan.strategy == "materialized"
    windows = layer.in_channels * layer.kernel_size[0] * layer.kernel_size[1]
    assert any("unfolded" in n for n in plan.notes) == (windows <= layer.out_channels)
    # the bias's per-sample gradients come out of the weight's calls, each made once: the window
    # call, or the grouped backward-weight call
    graph = next(iter(compiled._compiled.values())).private.graph_module.graph
    calls = [n for n in graph.nodes if n.target == torch.ops.dpcompile.conv_window_grads.default]
    assert [n.args[-1] for n in calls] == ([True] if windows <= layer.out_channels else [])
    grouped = [n.args[-1] for n in graph.nodes
               if n.target == torch.ops.aten.convolution_backward.default and n.args[-2] == x.shape[0]]
    assert grouped == ([] if windows <= layer.out_channels else [[False, True, True]])
    assert compiled.plans()["0.bias"].notes == ["per-sample gradients from the weight's per-sample calls"]


class Penalized(nn.Module):
    """A first layer whose weight also enters each output outside the convolution."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 32, 3, padding=1)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(h) + 0.1 * self.conv.weight.pow(2).sum()


def test_bias_keeps_its_own_sum_when_the_weight_is_used_elsewhere():
    """The weight's gradient is not its convolution's alone: no window call is made for the bias
    (it would compute per-sample weight gradients nobody uses), and everything stays exact."""
    torch.manual_seed(5)
    model = Penalized().to(D)
    compiled = assert_matches_reference(model, torch.randn(5, 3, 6, 6, dtype=D))
    graph = next(iter(compiled._compiled.values())).private.graph_module.graph
    assert not [n for n in graph.nodes if n.target == torch.ops.dpcompile.conv_window_grads.default and n.args[-1]]
    assert compiled.plans()["conv.bias"].notes == []


@pytest.mark.parametrize("groups, frames", [(1, (1, 1)), (2, (2, 1)), (1, (1, 3))])
def test_window_call_gives_per_sample_bias_gradients(groups, frames):
    """The window call with a row of ones: per-sample weight gradients unchanged, followed by
    each sample's output gradient summed over positions and frames, per group."""
    torch.manual_seed(4)
    batch, (outer, inner) = 5, frames
    conv = nn.Conv2d(2, 8, 3, padding=1, groups=groups).to(D)
    n = outer * batch * inner
    x = torch.randn(n, 2, 6, 6, dtype=D)
    grad = torch.randn(n, 8, 6, 6, dtype=D)
    args = (x, grad, list(conv.weight.shape), [1, 1], [1, 1], [1, 1], groups, outer, inner, 2)
    weights = torch.ops.dpcompile.conv_window_grads(*args)
    both = torch.ops.dpcompile.conv_window_grads(*args, True)
    frame_of = torch.arange(n).reshape(outer, batch, inner)
    expected = torch.stack([
        torch.cat([g.flatten() for g in torch.autograd.grad(
            conv(x[frame_of[:, b].reshape(-1)]), (conv.weight, conv.bias), grad[frame_of[:, b].reshape(-1)])])
        for b in range(batch)
    ])
    torch.testing.assert_close(both, expected)
    torch.testing.assert_close(weights, expected[:, :conv.weight.numel()])


class Stack(nn.Module):
    """Convolutions of every kind the deferred clipped sum must handle: grouped, transposed, 1-D,
    and frames folded into the batch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.temporal = nn.Conv1d(4, 5, 3)
        self.head = nn.Linear(5, 2)

    def forward(self, x):  # (B, 2, 3, 6, 6): two frames per sample
        b = x.shape[0]
        h = torch.tanh(self.grouped(torch.relu(self.conv(x.flatten(0, 1)))))
        h = self.up(h).mean(-1)  # (B·2, 4, 8)
        h = self.temporal(h.view(b, 2, 4, 8).mean(1))  # (B, 5, 6)
        return self.head(h.mean(-1))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("deferred", [True, False], ids=["deferred", "held"])
def test_clipped_sum_from_scaled_output_gradient(monkeypatch, deferred, clipping):
    """Whether a convolution's per-sample gradients are held for the clipped sum or it is
    recomputed from the clip-scaled output gradient, norms and clipped sums are exact."""
    monkeypatch.setattr(grad_forms, "CONV_DEFER_RATIO", 0.0 if deferred else float("inf"))
    monkeypatch.setattr(grad_forms, "CONV_SAMPLES_PER_CALL_CPU", 2)
    monkeypatch.setattr(grad_forms, "CONV_ONE_CALL_BYTES_CPU", 0)
    torch.manual_seed(4)
    compiled = assert_matches_reference(Stack().to(D), torch.randn(5, 2, 3, 6, 6, dtype=D), clipping=clipping)
    materialized = {n: p for n, p in compiled.plans().items() if p.strategy == "materialized"}
    assert materialized, "the test needs convolutions whose norms come from per-sample gradients"
    for plan in materialized.values():
        assert any("clip-scaled output gradient" in n for n in plan.notes) == deferred


def test_which_convolutions_defer():
    """The CIFAR-10 CNN at B=256: the third layer's per-sample gradients (36 MiB) dwarf its input
    and output gradient (8 MiB) and are not held; the second layer's (18 MiB against 24) are."""
    def form(c_in, c_out, size):
        x, grad = torch.empty(256, c_in, size, size), torch.empty(256, c_out, size, size)
        shape = (c_out, c_in, 3, 3)
        return Convolution(x, grad, shape, (1, 1), (1, 1), (1, 1), False, (0, 0), 1, SampleDim(0), 256, shape)

    assert form(64, 64, 8).defers_clipped_sum
    assert not form(32, 64, 16).defers_clipped_sum
    assert not form(3, 32, 32).defers_clipped_sum


def test_which_convolutions_take_ghost_norms_from_position_grams():
    """The CIFAR-10 CNN at B=256: the third and fourth layers (64 channels in, 8×8 and 4×4) take
    ghost norms from position Grams; the first two materialize; the MNIST CNN's second layer
    (16→32, 4×4 kernel, stride 2, 5×5 positions: windows of 256 from 169 input positions) takes
    ghost norms from its unfolded windows, the cheaper ghost there."""
    def form(c_in, c_out, size, kernel=3, stride=1, padding=1):
        x = torch.empty(256, c_in, size, size)
        out = (size + 2 * padding - kernel) // stride + 1
        grad = torch.empty(256, c_out, out, out)
        shape = (c_out, c_in, kernel, kernel)
        return Convolution(x, grad, shape, (stride,) * 2, (padding,) * 2, (1, 1), False, (0, 0), 1,
                           SampleDim(0), 256, shape)

    for layer in form(64, 64, 8), form(64, 128, 4):
        assert layer.prefers_ghost() and layer.uses_position_grams
    for layer in form(3, 32, 32), form(32, 64, 16):
        assert not layer.prefers_ghost()
    mnist = form(16, 32, 13, kernel=4, stride=2, padding=0)
    assert mnist.prefers_ghost() and not mnist.uses_position_grams


class SmallMaps(nn.Module):
    """Late convolutions of a CNN: few positions, wide windows (ghost norms from position Grams),
    grouped, strided and transposed."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(6, 12, 3, padding=1)
        self.grouped = nn.Conv2d(12, 24, 3, padding=2, dilation=2, groups=2)
        self.strided = nn.Conv2d(24, 16, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.head(self.up(torch.tanh(self.strided(h))).mean((2, 3)))


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_position_gram_ghost_norms_match_the_reference(clipping):
    torch.manual_seed(5)
    compiled = assert_matches_reference(SmallMaps().to(D), torch.randn(5, 6, 4, 4, dtype=D), clipping=clipping)
    plans = compiled.plans()
    gram = [n for n, p in plans.items() if any("Grams of input positions" in note for note in p.notes)]
    assert set(gram) == {"conv.weight", "grouped.weight", "strided.weight", "up.weight"}
    assert all(plans[n].strategy == "ghost" for n in gram)
