"""Models every runtime test trains: the shapes a DP library must cover."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    def __init__(self, d=6, classes=3):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, classes))

    def forward(self, x):
        return self.net(x)


class CNN(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4 * 4 * 4, classes)

    def forward(self, x):
        return self.head(F.relu(self.norm(self.conv(x))).flatten(1))


class PooledCNN(nn.Module):
    """ReLUs read only through pools: the forward saves their masks as bytes (passes.saved_values)."""

    def __init__(self, classes=3):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
            nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


class SeqLinearNorm(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, classes)

    def forward(self, x):  # (B, T, 5)
        return self.head(self.norm(self.proj(x)).mean(1))


class TextEmbedding(nn.Module):
    def __init__(self, vocab=20, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 6, padding_idx=0)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.embed(x).mean(1))


class Transformer(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.proj = nn.Linear(5, 8)
        self.layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.layer(self.proj(x)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab=20, classes=3):
        super().__init__()
        self.embed = nn.Embedding(vocab, 6)
        self.lstm = nn.LSTM(6, 7, batch_first=True)
        self.head = nn.Linear(7, classes)

    def forward(self, x):
        out, _ = self.lstm(self.embed(x))
        return self.head(out[:, -1])


class RawParameter(nn.Module):
    """A custom layer: raw parameters, no nn.Linear."""

    def __init__(self, classes=3):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, classes) * 0.3)
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return torch.tanh(x * self.scale) @ self.w


class Tied(nn.Module):
    def __init__(self, vocab=20):
        super().__init__()
        self.embed = nn.Embedding(vocab, 6)
        self.out = nn.Linear(6, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(torch.tanh(self.embed(x)).mean(1))


class Twice(nn.Module):
    def __init__(self, classes=3):
        super().__init__()
        self.lin = nn.Linear(6, 6)
        self.head = nn.Linear(6, classes)

    def forward(self, x):
        return self.head(self.lin(torch.tanh(self.lin(x))))


def dataset_for(name: str, n: int = 40, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    if name in ("mlp", "raw", "twice", "frozen"):
        x = torch.randn(n, 6, generator=g)
    elif name == "cnn":
        x = torch.randn(n, 1, 6, 6, generator=g)
    elif name == "pooled_cnn":
        x = torch.randn(n, 1, 8, 8, generator=g)
    elif name in ("seq", "transformer"):
        x = torch.randn(n, 4, 5, generator=g)
    else:
        x = torch.randint(0, 20, (n, 5), generator=g)
    classes = 20 if name == "tied" else 3
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def model_for(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = {
        "mlp": MLP, "cnn": CNN, "pooled_cnn": PooledCNN, "seq": SeqLinearNorm, "embedding": TextEmbedding,
        "transformer": Transformer, "lstm": LSTMClassifier, "raw": RawParameter, "tied": Tied,
        "twice": Twice, "frozen": MLP,
    }[name]()
    if name == "frozen":
        model.net[0].weight.requires_grad_(False)
    return model
