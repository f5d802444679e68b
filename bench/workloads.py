"""Benchmark workloads on synthetic data of the real shapes (nothing is downloaded).

End-to-end models follow the Opacus paper's benchmarks (MNIST CNN, CIFAR-10 CNN, an IMDb-style
embedding + LSTM classifier) plus a small transformer encoder and a 784-512-512-10 MLP. Layer
workloads measure one layer type at a time, in the manner of the Opacus paper's Figure 2.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Workload:
    name: str
    kind: str  # "model" or "layer"
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], torch.Tensor]
    classes: int
    dataset_size: int  # for the sample rate and the Poisson epoch
    note: str = ""

    def batch(self, size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return self.inputs(size, g), torch.randint(0, self.classes, (size,), generator=g)


class Flatten2(nn.Module):
    """Reduce any layer output to (B, features) for the classification loss."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) if x.dim() <= 2 else x.mean(tuple(range(2, x.dim()))).flatten(1)


# ---- end-to-end models ------------------------------------------------------------------


def mnist_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10),
    )


def cifar10_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2, 2),
        nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten(), nn.Linear(128, 10),
    )


class IMDbLSTM(nn.Module):
    def __init__(self, vocab: int = 10_000, embed: int = 100, hidden: int = 100) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


class Encoder(nn.Module):
    def __init__(self, d_model: int = 128, heads: int = 4, layers: int = 2, classes: int = 10) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x).mean(1))


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def _randn(*shape: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.randn(n, *shape, generator=g)


def _tokens(vocab: int, length: int) -> Callable[[int, torch.Generator], torch.Tensor]:
    return lambda n, g: torch.randint(0, vocab, (n, length), generator=g)


def models(quick: bool = False) -> list[Workload]:
    if quick:
        return [
            Workload("mlp", "model", lambda: nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 4)),
                     _randn(20), 4, 200),
            Workload("lstm", "model", lambda: IMDbLSTM(50, 8, 8), _tokens(50, 6), 2, 200),
        ]
    return [
        Workload("mnist_cnn", "model", mnist_cnn, _randn(1, 28, 28), 10, 60_000, "Opacus paper MNIST CNN"),
        Workload("cifar10_cnn", "model", cifar10_cnn, _randn(3, 32, 32), 10, 50_000, "Opacus CIFAR-10 CNN"),
        Workload("imdb_lstm", "model", IMDbLSTM, _tokens(10_000, 64), 2, 25_000,
                 "embedding 10k×100, LSTM 100, T=64"),
        Workload("transformer", "model", Encoder, _randn(32, 128), 10, 50_000,
                 "2 encoder layers, d=128, 4 heads, T=32"),
        Workload("mlp", "model", mlp, _randn(784), 10, 60_000, "784-512-512-10"),
    ]


# ---- single layers (Opacus paper, Figure 2) ---------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, d: int = 128, heads: int = 4) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attention(x, x, x, need_weights=False)[0]


class LastStep(nn.Module):
    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rnn(x)[0]


def _layer(name: str, layer: Callable[[], nn.Module], inputs: Callable[[int, torch.Generator], torch.Tensor],
           note: str) -> Workload:
    return Workload(name, "layer", lambda: nn.Sequential(layer(), Flatten2()), inputs, 1, 50_000, note)


def layers(quick: bool = False) -> list[Workload]:
    if quick:
        return [_layer("linear", lambda: nn.Linear(8, 8), _randn(8), "Linear 8→8")]
    return [
        _layer("linear", lambda: nn.Linear(512, 512), _randn(512), "Linear 512→512"),
        _layer("conv", lambda: nn.Conv2d(16, 32, 3, padding=1), _randn(16, 32, 32), "Conv2d 16→32, 3×3, 32×32"),
        _layer("layernorm", lambda: nn.LayerNorm(512), _randn(16, 512), "LayerNorm 512 on (B, 16, 512)"),
        _layer("groupnorm", lambda: nn.GroupNorm(8, 64), _randn(64, 16, 16), "GroupNorm 8 groups, 64×16×16"),
        _layer("instancenorm", lambda: nn.InstanceNorm2d(64, affine=True), _randn(64, 16, 16),
               "InstanceNorm2d 64×16×16"),
        _layer("embedding", lambda: nn.Embedding(10_000, 128), _tokens(10_000, 64), "Embedding 10k×128, T=64"),
        _layer("mha", SelfAttention, _randn(32, 128), "MultiheadAttention d=128, 4 heads, T=32"),
        _layer("lstm", lambda: LastStep(nn.LSTM(64, 64, batch_first=True)), _randn(32, 64), "LSTM 64→64, T=32"),
    ]
