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
)
def test_grouped_backward_and_unfold_agree_with_autograd(dims, transposed, groups, kernel, stride, padding,
                                                         dilation, frames):
    torch.manual_seed(dims + 3 * kernel)
    batch, outer, inner = 3, *frames
    conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    if transposed:
        conv_cls = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    conv = conv_cls(2, 4, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                    bias=False).to(D)
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
def test_materialized_in_sample_blocks(monkeypatch, frames):
    """On CPU the grouped backward runs a few samples per call; the blocks join to the whole."""
    monkeypatch.setattr(grad_forms, "CONV_SAMPLES_PER_CALL_CPU", 2)
    monkeypatch.setattr(grad_forms, "CONV_ONE_CALL_BYTES_CPU", 0)
    torch.manual_seed(1)
    batch, (outer, inner) = 5, frames
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False).to(D)
    x = torch.randn(outer * batch * inner, 3, 6, 6, dtype=D)
    grad = torch.randn(outer * batch * inner, 4, 6, 6, dtype=D)
    form = Convolution(x, grad, tuple(conv.weight.shape), (1, 1), (1, 1), (1, 1), False, (0, 0), 1,
                       SampleDim(0, outer, inner), batch, tuple(conv.weight.shape))
    blocks = form.materialize_chunks()
    assert [b.shape[0] for b in blocks] == [2, 2, 1]
    torch.testing.assert_close(torch.cat(blocks), conv_outer(form).materialize())
