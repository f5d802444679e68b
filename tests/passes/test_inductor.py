"""The rewritten graphs through TorchInductor, in float32, against the float64 reference."""

import pytest
import torch
from torch import nn

from passes import PerSampleGradients
from tests.passes.harness import cross_entropy
from tests.reference import clipped_reference

pytestmark = pytest.mark.inductor


class TextLSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


def cases():
    torch.manual_seed(0)
    yield "mlp", nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3)), torch.randn(6, 10)
    # first layer: windows of 9 ≤ 12 output channels, per-sample gradients through
    # dpcompile::conv_window_grads; second: 9 positions, ghost norm from position Grams
    yield "cnn", nn.Sequential(
        nn.Conv2d(1, 12, 3, stride=2), nn.GroupNorm(2, 12), nn.ReLU(), nn.Conv2d(12, 8, 3, padding=1),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 3)
    ), torch.randn(6, 1, 8, 8)
    yield "lstm", TextLSTM(), torch.randint(0, 20, (6, 5))
    yield "transformer", Encoder(), torch.randn(6, 4, 16)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
@pytest.mark.parametrize("name, model, x", list(cases()), ids=[c[0] for c in cases()])
def test_inductor_matches_reference(name, model, x, clipping):
    y = torch.randint(0, 3, (x.shape[0],))
    names = [n for n, _ in model.named_parameters()]
    limit = {n: 0.5 for n in names} if clipping == "per_layer" else 0.5
    compiled = PerSampleGradients(model, cross_entropy, clipping=clipping, backend="inductor")
    arg = [limit[n] for n in names] if clipping == "per_layer" else limit
    mask = torch.tensor([1.0, 1, 0, 1, 1, 1])
    result = compiled(x, y, max_grad_norm=arg, mask=mask)
    reference = model.to(torch.float64)
    x64 = x.to(torch.float64) if x.is_floating_point() else x
    norms, clipped = clipped_reference(reference, cross_entropy, (x64,), (y,), limit, clipping, mask=mask.double())
    model.to(torch.float32)
    torch.testing.assert_close(result.per_sample_norms, norms.float(), rtol=1e-4, atol=1e-5)
    for n in names:
        torch.testing.assert_close(result.clipped_grads[n], clipped[n].float(), rtol=1e-4, atol=1e-5)
    if name == "cnn":
        assert any("samples at a time" in n for n in compiled.plans()["0.weight"].notes)
        assert any("Grams of input positions" in n for n in compiled.plans()["3.weight"].notes)
    # a second batch of the same shape reuses the compiled graph
    compiled(x, y, max_grad_norm=arg, mask=mask)
    assert compiled.num_compiled == 1
