"""Per-sample rules for the matmul family and convolutions, against the micro-batch reference."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tests.passes.harness import assert_matches_reference

D = torch.float64


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@given(
    batch=st.integers(1, 5),
    d_in=st.integers(1, 7),
    d_out=st.integers(1, 7),
    seq=st.sampled_from([(), (3,), (2, 3)]),
    bias=st.booleans(),
)
def test_linear(batch, d_in, d_out, seq, bias):
    torch.manual_seed(batch * 100 + d_in * 10 + d_out)
    model = nn.Linear(d_in, d_out, bias=bias).to(D)
    x = torch.randn(batch, *seq, d_in, dtype=D)
    assert_matches_reference(model, x)


@pytest.mark.parametrize("seq", [1, 4, 40])
def test_linear_ghost_and_materialized_agree(seq):
    """Long sequences pick ghost norms, short ones materialize: both exact."""
    torch.manual_seed(seq)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(D)
    compiled = assert_matches_reference(model, torch.randn(4, seq, 6, dtype=D))
    strategies = {p.strategy for p in compiled.plans().values()}
    assert strategies <= {"ghost", "materialized", "dense"}


def test_linear_strategy_follows_cost():
    torch.manual_seed(0)
    wide = nn.Linear(64, 64).to(D)
    short = assert_matches_reference(wide, torch.randn(3, 2, 64, dtype=D)).plans()["weight"]
    assert short.strategy == "ghost"  # T=2: 2·(64+64) < 64·64
    narrow = nn.Linear(2, 2).to(D)
    long = assert_matches_reference(narrow, torch.randn(3, 30, 2, dtype=D)).plans()["weight"]
    assert long.strategy == "materialized"  # T=30: 30·4 > 4


@given(
    batch=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    channels=st.sampled_from([(2, 2), (2, 4), (4, 2)]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    dims=st.sampled_from([1, 2, 3]),
)
def test_conv(batch, groups, channels, kernel, stride, padding, dilation, bias, dims):
    torch.manual_seed(batch + kernel * 7 + dims)
    c_in, c_out = channels
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims]
    model = conv(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                 groups=groups, bias=bias).to(D)
    size = {1: 9, 2: 7, 3: 5}[dims]
    x = torch.randn(batch, c_in, *([size] * dims), dtype=D)
    assert_matches_reference(model, x)


@pytest.mark.parametrize("kernel", [2, 3, 4])
@pytest.mark.parametrize("mode", ["zeros", "reflect", "circular"])
def test_conv_same_padding(kernel, mode):
    torch.manual_seed(kernel)
    model = nn.Conv2d(2, 3, kernel, padding="same", padding_mode=mode).to(D)
    assert_matches_reference(model, torch.randn(3, 2, 6, 6, dtype=D))


@given(
    batch=st.integers(1, 4),
    groups=st.sampled_from([1, 2]),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 3),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    dims=st.sampled_from([1, 2, 3]),
    data=st.data(),
)
def test_conv_transpose(batch, groups, kernel, stride, padding, dilation, dims, data):
    torch.manual_seed(batch * 3 + kernel + stride)
    output_padding = data.draw(st.integers(0, max(stride, dilation) - 1))
    conv = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}[dims]
    model = conv(2, 4, kernel, stride=stride, padding=padding, output_padding=output_padding,
                 dilation=dilation, groups=groups).to(D)
    x = torch.randn(batch, 2, *([4] * dims), dtype=D)
    assert_matches_reference(model, x)


def test_depthwise_conv():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4, padding=1), nn.Conv2d(4, 8, 1)).to(D)
    assert_matches_reference(model, torch.randn(3, 4, 6, 6, dtype=D))


def test_mnist_cnn():
    """The Opacus paper's MNIST CNN."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    ).to(D)
    from tests.passes.harness import cross_entropy

    x = torch.randn(4, 1, 28, 28, dtype=D)
    y = torch.randint(0, 10, (4,))
    assert_matches_reference(model, x, y, cross_entropy)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_conv_materialized_in_sample_blocks(monkeypatch, clipping):
    """Per-sample conv gradients made a few samples per call: norms and clipped sums unchanged."""
    from passes import grad_forms

    monkeypatch.setattr(grad_forms, "CONV_SAMPLES_PER_CALL_CPU", 4)
    monkeypatch.setattr(grad_forms, "CONV_ONE_CALL_BYTES_CPU", 0)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(8, 8, 3, padding=1)).to(D)
    x = torch.randn(11, 3, 16, 16, dtype=D)  # 8×8 maps at the second layer: materialized, not ghost
    mask = torch.ones(11, dtype=D)
    mask[[2, 9]] = 0
    compiled = assert_matches_reference(model, x, clipping=clipping, mask=mask)
    assert compiled.plans()["0.weight"].strategy == "materialized"
    assert compiled.plans()["3.weight"].strategy == "materialized"
