"""``dpcompile explain``: the compiler's per-parameter decisions for a model, from the command line.

    dpcompile explain mnist-cnn
    dpcompile explain transformer --batch-size 32 --code
    dpcompile explain mypackage.models:make_model --input-shape 3,32,32
    dpcompile explain ./model.py:Net --input-shape 16 --json

MODEL is a built-in demo (``dpcompile explain --list``) or ``module:attribute`` /
``path/to/file.py:attribute``, where the attribute is an ``nn.Module`` class or a function
returning a module, called without arguments. Random inputs of shape ``(batch, *input-shape)``
are fed to it: floats from a normal distribution, or integers in ``[0, vocab-size)`` for
``--dtype int64`` (token ids).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from passes.errors import DPCompileError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16, "int64": torch.int64, "int32": torch.int32}


# ---- demo models --------------------------------------------------------------------------------


class MnistCNN(nn.Module):
    """The usual DP-SGD MNIST network: two strided convolutions, two linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 8, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 32, 4, stride=2)
        self.fc1 = nn.Linear(32 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2, 1)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2, 1)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                 nn.Linear(512, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1))


class TransformerClassifier(nn.Module):
    """Token embedding, one encoder layer (d=128, 4 heads), mean pooling, a linear head."""

    def __init__(self, vocab: int = 1000, dim: int = 128, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.layer(self.embed(tokens)).mean(1))


class LSTMClassifier(nn.Module):
    def __init__(self, vocab: int = 1000, dim: int = 64, hidden: int = 64, classes: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, hidden, batch_first=True)
        self.head = nn.Linear(hidden, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(tokens))
        return self.head(out[:, -1])


class TiedLM(nn.Module):
    """A bag-of-words language model whose output projection is the embedding table (tied)."""

    def __init__(self, vocab: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.mix(self.embed(tokens).mean(1))))


def _digits_cnn() -> nn.Module:
    from dpcompile.examples.digits import DigitsCNN

    return DigitsCNN()


@dataclass
class Demo:
    factory: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    dtype: str
    vocab_size: int
    description: str


DEMOS: dict[str, Demo] = {
    "mnist-cnn": Demo(MnistCNN, (1, 28, 28), "float32", 0, "MNIST CNN, 26k parameters"),
    "mlp": Demo(MLP, (784,), "float32", 0, "784-512-512-10 MLP"),
    "digits-cnn": Demo(_digits_cnn, (1, 8, 8), "float32", 0, "the `dpcompile digits` CNN"),
    "transformer": Demo(TransformerClassifier, (32,), "int64", 1000,
                        "embedding + encoder layer (d=128, T=32)"),
    "lstm": Demo(LSTMClassifier, (32,), "int64", 1000, "embedding + LSTM (T=32)"),
    "tied-lm": Demo(TiedLM, (16,), "int64", 1000, "embedding tied to the output projection"),
}


# ---- the command --------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add the ``explain`` sub-command."""
    p = subparsers.add_parser(
        "explain", help="how the compiler makes each parameter's gradient private",
        description="Compile a model's private training step and print, per parameter, the "
                    "per-sample rule used (ghost, materialized, embedding, dense, vmap fallback), "
                    "its estimated cost, and tied parameters.",
        epilog="MODEL: " + ", ".join(DEMOS) + ", or module:attribute, or path/to/file.py:attribute "
               "(an nn.Module class or a function returning a module).",
    )
    p.add_argument("model", nargs="?", metavar="MODEL", help="a demo name or module:attribute")
    p.add_argument("--list", action="store_true", help="list the demo models and exit")
    p.add_argument("--input-shape", metavar="D1,D2,...",
                   help="shape of one sample, without the batch dimension (e.g. 1,28,28)")
    p.add_argument("--batch-size", type=int, default=8, help="rows in the example batch (default 8)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="input dtype (default float32; int64 for token ids)")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="integer inputs are drawn from [0, vocab-size) (default 100)")
    p.add_argument("--code", action="store_true", help="also print the rewritten graphs as code")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and inputs (default 0)")
    p.set_defaults(run=run_explain)


def load_model(spec: str) -> tuple[nn.Module, Demo | None]:
    """A demo by name, or the module built by ``module:attribute`` / ``file.py:attribute``."""
    if spec in DEMOS:
        demo = DEMOS[spec]
        return demo.factory(), demo
    if ":" not in spec:
        raise ValueError(
            f"unknown model {spec!r}: give a demo ({', '.join(DEMOS)}) or module:attribute "
            "(e.g. mypackage.models:Net or ./model.py:make_model)"
        )
    where, _, attribute = spec.rpartition(":")
    if where.endswith(".py") or os.sep in where:
        if not os.path.exists(where):
            raise ValueError(f"no such file: {where}")
        name = os.path.splitext(os.path.basename(where))[0]
        module_spec = importlib.util.spec_from_file_location(name, where)
        if module_spec is None or module_spec.loader is None:
            raise ValueError(f"cannot import {where}")
        source = importlib.util.module_from_spec(module_spec)
        sys.modules.setdefault(name, source)
        module_spec.loader.exec_module(source)
    else:
        try:
            source = importlib.import_module(where)
        except ImportError as error:
            raise ValueError(f"cannot import {where!r}: {error}") from error
    target: Any = source
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"{where} has no attribute {attribute!r}")
        target = getattr(target, part)
    model = target if isinstance(target, nn.Module) else target() if callable(target) else target
    if not isinstance(model, nn.Module):
        raise ValueError(f"{spec} gave a {type(model).__name__}, not a torch.nn.Module")
    return model, None


def example_inputs(shape: tuple[int, ...], batch: int, dtype: torch.dtype, vocab: int,
                   generator: torch.Generator) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(batch, *shape, generator=generator).to(dtype)
    return torch.randint(0, vocab, (batch, *shape), generator=generator, dtype=dtype)


def _shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.replace("x", ",").split(",") if s.strip())
    except ValueError as error:
        raise ValueError(f"--input-shape must be integers separated by commas, got {text!r}") from error
    if any(s <= 0 for s in shape):
        raise ValueError(f"--input-shape must be positive, got {text!r}")
    return shape


def run_explain(args: argparse.Namespace) -> int:
    from dpcompile.explanation import explain

    if args.list:
        for name, entry in DEMOS.items():
            dims = ",".join(str(s) for s in entry.input_shape)
            print(f"{name:12s} {entry.description} (input {dims} {entry.dtype})")
        return 0
    if not args.model:
        raise ValueError("give a MODEL (a demo name or module:attribute); --list shows the demos")
    if args.batch_size < 2:
        raise ValueError("--batch-size must be at least 2")
    torch.manual_seed(args.seed)
    model, demo = load_model(args.model)
    if args.input_shape:
        shape = _shape(args.input_shape)
    elif demo is not None:
        shape = demo.input_shape
    else:
        raise ValueError(f"--input-shape is needed for {args.model} (the shape of one sample)")
    dtype_name = args.dtype or (demo.dtype if demo is not None else "float32")
    vocab = args.vocab_size or (demo.vocab_size if demo is not None and demo.vocab_size else 100)
    dtype = DTYPES[dtype_name]
    if dtype.is_floating_point:
        model = model.to(dtype)
    generator = torch.Generator().manual_seed(args.seed)
    x = example_inputs(shape, args.batch_size, dtype, vocab, generator)
    try:
        explanation = explain(model, x, code=args.code)
    except DPCompileError as error:
        print(f"dpcompile explain: {args.model} cannot be trained privately: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(explanation.to_dict(), indent=2))
        return 0
    print(explanation)
    if args.code and explanation.code:
        print()
        print(explanation.code)
    return 0
