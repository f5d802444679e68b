"""Embeddings, normalization affines, elementwise parameters."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from tests.passes.harness import assert_matches_reference

D = torch.float64


class Pool(nn.Module):
    """Embedding then a per-sample readout, so that every row used gets a distinct gradient."""

    def __init__(self, embed: nn.Module, dim: int) -> None:
        super().__init__()
        self.embed = embed
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        if h.dim() == 3:
            h = torch.tanh(h).sum(1)
        return self.out(h)


@given(
    batch=st.integers(1, 5),
    vocab=st.integers(2, 12),
    seq=st.sampled_from([1, 3, 8, 20]),
    padding=st.booleans(),
)
def test_embedding(batch, vocab, seq, padding):
    torch.manual_seed(batch * 31 + vocab + seq)
    embed = nn.Embedding(vocab, 4, padding_idx=0 if padding else None).to(D)
    model = Pool(embed, 4).to(D)
    x = torch.randint(0, vocab, (batch, seq))
    x[:, 0] = x[:, -1]  # a repeated index in every sample
    compiled = assert_matches_reference(model, x)
    assert compiled.plans()["embed.weight"].strategy == "embedding"


def test_embedding_long_sequence_uses_sorted_runs():
    """Beyond LOOKUP_GHOST_MAX_POSITIONS positions the norm sums runs of sorted (sample, row) keys."""
    from passes.grad_forms import LOOKUP_GHOST_MAX_POSITIONS

    torch.manual_seed(0)
    model = Pool(nn.Embedding(7, 5), 5).to(D)
    x = torch.randint(0, 7, (3, LOOKUP_GHOST_MAX_POSITIONS + 20))  # many repeats
    assert_matches_reference(model, x)


def test_embedding_table_is_never_materialized_per_sample():
    torch.manual_seed(0)
    vocab, dim, batch = 1000, 8, 3
    model = Pool(nn.Embedding(vocab, dim), dim).to(D)
    compiled = assert_matches_reference(model, torch.randint(0, vocab, (batch, 5)))
    step = next(iter(compiled._compiled.values()))
    for node in step.private.graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.numel() < batch * vocab * dim, f"{node}: {tuple(val.shape)}"


@given(
    batch=st.integers(1, 4),
    mode=st.sampled_from(["sum", "mean", "max"]),
    bag=st.integers(1, 6),
    padding=st.booleans(),
    weighted=st.booleans(),
)
def test_embedding_bag(batch, mode, bag, padding, weighted):
    torch.manual_seed(batch + bag * 5)
    weighted = weighted and mode == "sum"
    embed = nn.EmbeddingBag(9, 4, mode=mode, padding_idx=0 if padding else None).to(D)
    x = torch.randint(0, 9, (batch, bag))
    x[:, -1] = x[:, 0]  # the same index twice in one bag

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = embed
            self.out = nn.Linear(4, 2)

        def forward(self, idx, w=None):
            return self.out(self.embed(idx, per_sample_weights=w))

    model = Bag().to(D)
    inputs = (x, torch.rand(batch, bag, dtype=D)) if weighted else (x,)
    assert_matches_reference(model, inputs)


@given(batch=st.integers(1, 4), affine=st.booleans(), bias=st.booleans(), seq=st.integers(1, 4))
def test_layer_norm(batch, affine, bias, seq):
    torch.manual_seed(batch + seq)
    model = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6, elementwise_affine=affine, bias=bias), nn.Linear(6, 2)).to(D)
    assert_matches_reference(model, torch.randn(batch, seq, 5, dtype=D))


@given(batch=st.integers(1, 4), groups=st.sampled_from([1, 2, 4]), spatial=st.sampled_from([1, 2, 3]))
def test_group_norm(batch, groups, spatial):
    torch.manual_seed(batch * groups)
    model = nn.Sequential(nn.GroupNorm(groups, 4)).to(D)
    x = torch.randn(batch, 4, *([3] * spatial), dtype=D)
    assert_matches_reference(model, x)


@pytest.mark.parametrize("norm, shape", [(nn.InstanceNorm1d, (5,)), (nn.InstanceNorm2d, (3, 3)), (nn.InstanceNorm3d, (2, 2, 2))])
def test_instance_norm(norm, shape):
    torch.manual_seed(0)
    model = nn.Sequential(norm(3, affine=True)).to(D)
    assert_matches_reference(model, torch.randn(4, 3, *shape, dtype=D))


def test_rms_norm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 2)).to(D)
    assert_matches_reference(model, torch.randn(3, 5, 4, dtype=D))


def test_batch_norm_in_eval_mode_is_per_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 2)).to(D)
    model[1].running_mean.normal_()
    model[1].eval()
    assert_matches_reference(model, torch.randn(3, 2, 4, 4, dtype=D))


class LayerScale(nn.Module):
    """ConvNeXt's layer scale and a raw bias: elementwise parameters."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.randn(channels, 1, 1))

    def forward(self, x):
        y = self.conv(x).permute(0, 2, 3, 1)
        y = (self.gamma * y).permute(0, 3, 1, 2)
        return x + y + self.shift


def test_layer_scale_and_bias_add():
    torch.manual_seed(0)
    assert_matches_reference(LayerScale(3).to(D), torch.randn(3, 3, 4, 4, dtype=D))


@pytest.mark.parametrize("num_parameters", [1, 3])
def test_prelu(num_parameters):
    torch.manual_seed(num_parameters)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.PReLU(num_parameters, init=0.3)).to(D)
    assert_matches_reference(model, torch.randn(4, 2, 6, dtype=D))
