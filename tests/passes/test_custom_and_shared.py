"""Custom layers (no registration) and parameters used more than once."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.passes.harness import assert_matches_reference

D = torch.float64


class RawMatmul(nn.Module):
    """A layer written with a raw nn.Parameter and torch.matmul on a 3-D input."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))
        self.b = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return torch.matmul(x, self.w) + self.b


class EinsumHeads(nn.Module):
    """A per-head weight (H, d, p) applied with einsum: the gradient goes through bmm."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(2, 3, 4))

    def forward(self, x):  # x: (B, T, H, d)
        return torch.einsum("bthd,hdp->bthp", x, self.w)


class WeirdOps(nn.Module):
    """Ops no rule knows: cumsum, a learned exponent, where, a weight-normalized matrix."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.rand(5) + 0.5)
        self.power = nn.Parameter(torch.tensor(1.3))
        self.g = nn.Parameter(torch.rand(3) + 0.5)
        self.v = nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        y = torch.cumsum(x * self.scale, dim=-1)
        y = torch.where(y > 0, y.abs().pow(self.power), -y)
        weight = self.g[:, None] * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(y, weight)


class SquareFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return 2 * grad * x * w, (grad * x * x).sum(0)


class CustomFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return SquareFn.apply(x, self.w)


def test_raw_parameter_layer():
    torch.manual_seed(0)
    assert_matches_reference(RawMatmul().to(D), torch.randn(3, 5, 4, dtype=D))


def test_einsum_per_head_weight():
    torch.manual_seed(0)
    assert_matches_reference(EinsumHeads().to(D), torch.randn(3, 4, 2, 3, dtype=D))


def test_ops_without_rules_fall_back_per_sample():
    torch.manual_seed(0)
    compiled = assert_matches_reference(WeirdOps().to(D), torch.randn(4, 2, 5, dtype=D))
    assert set(compiled.plans()) == {"scale", "power", "g", "v"}


def test_custom_autograd_function():
    torch.manual_seed(0)
    assert_matches_reference(CustomFunction().to(D), torch.randn(3, 4, dtype=D))


class TiedLM(nn.Module):
    """Input embedding tied to the output projection."""

    def __init__(self, vocab=11, dim=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        return self.head(torch.tanh(self.mix(self.embed(x))))


def lm_loss(logits, y):
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").sum(1)


def test_tied_embedding_norm_includes_cross_terms():
    torch.manual_seed(0)
    x = torch.randint(0, 11, (3, 6))
    compiled = assert_matches_reference(TiedLM().to(D), x, x.roll(1, 1), lm_loss)
    assert "embedding" in compiled.plans()["embed.weight"].strategy


def test_tied_embedding_long_sequence():
    torch.manual_seed(1)
    x = torch.randint(0, 11, (2, 150))  # beyond the equality-trick threshold: sorted runs
    assert_matches_reference(TiedLM().to(D), x, x.roll(1, 1), lm_loss)


class Twice(nn.Module):
    """One Linear applied twice, and a conv shared by two branches."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.conv = nn.Conv1d(4, 4, 3, padding=1)

    def forward(self, x):  # (B, T, 4)
        h = self.lin(torch.tanh(self.lin(x)))
        c = h.transpose(1, 2)
        return self.conv(c) + self.conv(torch.relu(c))


def test_module_used_twice():
    torch.manual_seed(0)
    compiled = assert_matches_reference(Twice().to(D), torch.randn(3, 5, 4, dtype=D))
    assert compiled.plans()["lin.weight"].uses == 2


def test_norm_of_sum_is_not_sum_of_norms():
    """A parameter used twice with opposite signs: its per-sample gradient is zero."""

    class Cancel(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) - self.lin(x)

    torch.manual_seed(0)
    model = Cancel().to(D)
    from passes import PerSampleGradients
    from tests.passes.harness import sum_loss

    result = PerSampleGradients(model, sum_loss, backend="eager")(torch.randn(4, 3, dtype=D), max_grad_norm=1.0)
    assert result.per_sample_norms.abs().max() < 1e-12


def test_frozen_parameters_get_no_gradient():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).to(D)
    model[0].weight.requires_grad_(False)
    compiled = assert_matches_reference(model, torch.randn(3, 3, dtype=D))
    assert "0.weight" not in compiled.plans()


def test_loss_written_with_arange_indexing():
    """-log p[arange(B), y]: indexing the batch dimension with arange(B) keeps samples apart."""

    def nll(out, y):
        logp = torch.log_softmax(out, 1)
        return -logp[torch.arange(out.shape[0]), y]

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(D)
    assert_matches_reference(model, torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,)), nll)


def test_indexing_the_batch_with_anything_else_is_rejected():
    from passes import PerSampleGradients, SampleMixingError

    def first_sample_loss(out, y):
        return out[torch.zeros(out.shape[0], dtype=torch.long), y]

    model = nn.Linear(4, 3).to(D)
    with pytest.raises(SampleMixingError, match="index"):
        PerSampleGradients(model, first_sample_loss, backend="eager")(
            torch.randn(5, 4, dtype=D), torch.randint(0, 3, (5,)), max_grad_norm=1.0
        )
