"""Real architectures, written out (no torchvision / transformers needed), small sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = nn.GroupNorm(2, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = nn.GroupNorm(2, cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.GroupNorm(2, cout))

    def forward(self, x):
        out = F.relu(self.norm1(self.conv1(x)))
        return F.relu(self.norm2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-18's shape with GroupNorm (as DP training uses it), narrow."""

    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.GroupNorm(2, 8), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(8, 8, 1), BasicBlock(8, 16, 2), BasicBlock(16, 16, 1))
        self.head = nn.Linear(16, classes)

    def forward(self, x):
        h = self.layers(self.stem(x))
        return self.head(F.adaptive_avg_pool2d(h, 1).flatten(1))


class ViT(nn.Module):
    """Patch embedding, class token, learned positions, pre-norm encoder, head."""

    def __init__(self, image: int = 8, patch: int = 4, dim: int = 16, classes: int = 5) -> None:
        super().__init__()
        n = (image // patch) ** 2
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.pos = nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, 2, 2 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        tokens = self.patch(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        h = torch.cat([cls, tokens], 1) + self.pos
        return self.head(self.norm(self.encoder(h))[:, 0])


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, 2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class GPT(nn.Module):
    """Token + position embeddings, causal attention blocks, GELU MLP, tied head."""

    def __init__(self, vocab: int = 30, dim: int = 16, heads: int = 2, layers: int = 2, context: int = 12) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(context, dim)
        self.blocks = nn.ModuleList()
        for _ in range(layers):
            self.blocks.append(nn.ModuleDict({
                "ln1": nn.LayerNorm(dim), "attn": CausalSelfAttention(dim, heads),
                "ln2": nn.LayerNorm(dim), "mlp": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
            }))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, idx):
        t = idx.shape[1]
        h = self.tokens(idx) + self.positions(torch.arange(t, device=idx.device))
        for block in self.blocks:
            h = h + block["attn"](block["ln1"](h))
            h = h + block["mlp"](block["ln2"](h))
        return self.head(self.ln(h))


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pw1 = nn.Linear(dim, 4 * dim)
        self.pw2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.1))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXt(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 2, 2)
        self.blocks = nn.Sequential(ConvNeXtBlock(8), ConvNeXtBlock(8))
        self.head = nn.Linear(8, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, expand: int, cout: int) -> None:
        super().__init__()
        mid = cin * expand
        self.net = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.GroupNorm(1, mid), nn.ReLU6(),
            nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False), nn.GroupNorm(1, mid), nn.ReLU6(),
            nn.Conv2d(mid, cout, 1, bias=False), nn.GroupNorm(1, cout),
        )
        self.residual = cin == cout

    def forward(self, x):
        y = self.net(x)
        return x + y if self.residual else y


class MobileNet(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU6(), InvertedResidual(8, 2, 8),
                                      InvertedResidual(8, 2, 12))
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class UNet(nn.Module):
    """Down, up (interpolate), skip concatenation: a segmentation net."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.down1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(2, 8), nn.SiLU())
        self.down2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.GroupNorm(2, 16), nn.SiLU())
        self.up = nn.ConvTranspose2d(16, 8, 2, stride=2)
        self.fuse = nn.Conv2d(16, 8, 3, padding=1)
        self.out = nn.Conv2d(8, classes, 1)

    def forward(self, x):
        a = self.down1(x)
        b = self.down2(a)
        u = self.up(b) + F.interpolate(b[:, :8], scale_factor=2.0, mode="nearest")
        return self.out(F.silu(self.fuse(torch.cat([a, u], 1))))


class BiLSTMTagger(nn.Module):
    def __init__(self, vocab: int = 30, classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, 8, padding_idx=0)
        self.lstm = nn.LSTM(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        return self.head(self.lstm(self.embed(x))[0])


def per_token_ce(logits, y):
    """Sequence losses: mean over positions of a per-token cross-entropy, per sample."""
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def per_pixel_ce(logits, y):
    return F.cross_entropy(logits, y, reduction="none").flatten(1).mean(1)


def cases(batch: int = 3):
    """(name, model factory, inputs, targets, per-sample loss)."""
    g = torch.Generator().manual_seed(0)
    ce = lambda out, y: F.cross_entropy(out, y, reduction="none")  # noqa: E731
    img = torch.randn(batch, 3, 8, 8, generator=g)
    labels = torch.randint(0, 5, (batch,), generator=g)
    tokens = torch.randint(1, 30, (batch, 12), generator=g)
    return [
        ("resnet", ResNet, img, labels, ce),
        ("vit", ViT, img, labels, ce),
        ("gpt", GPT, tokens, tokens.roll(-1, 1), per_token_ce),
        ("convnext", ConvNeXt, img, labels, ce),
        ("mobilenet", MobileNet, img, labels, ce),
        ("unet", UNet, img, torch.randint(0, 3, (batch, 8, 8), generator=g), per_pixel_ce),
        ("bilstm_tagger", BiLSTMTagger, tokens, torch.randint(0, 4, (batch, 12), generator=g), per_token_ce),
    ]


