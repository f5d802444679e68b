"""Train a small CNN on scikit-learn's digits privately and non-privately, side by side.

    dpcompile digits [--epsilon 3] [--epochs 15] [--backend inductor]
    torchrun --nproc-per-node 2 -m dpcompile digits      # the same job on 2 processes (DDP)

The data ships with scikit-learn (1,797 8x8 images; nothing is downloaded). The private run uses
an unchanged PyTorch training loop after ``dpcompile.dp_compile``; the non-private run is the same
model, seed and loop without it.

Under torchrun (``WORLD_SIZE`` set) the private run is one distributed job: the process group is
initialised from torchrun's environment (gloo on CPU, NCCL with CUDA), the model is wrapped in
DistributedDataParallel, each rank Poisson-samples its shard with a per-rank batch size of
``--batch-size / world size`` (so the global expected batch stays ``--batch-size``), and only
rank 0 prints and runs the non-private baseline.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def load_digits_tensors(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "the digits example needs scikit-learn: pip install 'dpcompile[examples]'"
        ) from error
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    x, y = x[order], y[order]
    split = int(0.8 * len(x))
    mean, std = x[:split].mean(), x[:split].std()
    x = (x - mean) / std
    return TensorDataset(x[:split], y[:split]), TensorDataset(x[split:], y[split:])


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(32 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    model.eval()
    with torch.no_grad():
        x, y = data.tensors
        device = next(model.parameters()).device
        x, y = x.to(device), y.to(device)
        correct = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return correct


def train(model: nn.Module, optimizer: torch.optim.Optimizer, loader: Any, epochs: int,
          label: str, test: TensorDataset, report: Callable[[int], str] = lambda e: "",
          verbose: bool = True, device: torch.device | None = None) -> list[dict[str, float]]:
    from tqdm import tqdm

    history = []
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        for x, y in tqdm(loader, desc=f"{label} epoch {epoch}/{epochs}", leave=False, disable=not verbose):
            if device is not None:
                x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        seconds = time.perf_counter() - start
        acc = accuracy(model, test)
        history.append({"epoch": epoch, "accuracy": acc, "seconds": seconds})
        if verbose:
            print(f"{label:>11} epoch {epoch:2d}: test accuracy {acc:6.2%}  {seconds:6.2f} s{report(epoch)}")
    return history


def _start_distributed() -> tuple[int, int]:
    """Join torchrun's job (rank, world size); (0, 1) when not launched by torchrun."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    import torch.distributed as dist

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def main(args: argparse.Namespace) -> int:
    rank, world_size = _start_distributed()
    try:
        return _run(args, rank, world_size)
    finally:
        if world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(args: argparse.Namespace, rank: int, world_size: int) -> int:
    import dpcompile

    verbose = rank == 0
    say = print if verbose else (lambda *a, **k: None)
    device = torch.device("cuda", torch.cuda.current_device()) if world_size > 1 and torch.cuda.is_available() else torch.device("cpu")
    train_set, test_set = load_digits_tensors(args.seed)
    say(f"digits: {len(train_set)} training and {len(test_set)} test images, batch size {args.batch_size}"
        + (f" ({args.batch_size // world_size} per rank on {world_size} ranks)" if world_size > 1 else ""))

    base_history = None
    if verbose:
        torch.manual_seed(args.seed)
        baseline = DigitsCNN()
        base_opt = torch.optim.SGD(baseline.parameters(), lr=args.lr, momentum=0.9)
        base_loader = DataLoader(train_set, batch_size=args.batch_size, shuffle=True)
        base_history = train(baseline, base_opt, base_loader, args.epochs, "non-private", test_set)

    torch.manual_seed(args.seed)
    model: nn.Module = DigitsCNN().to(device)
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=max(1, args.batch_size // world_size))
    start = time.perf_counter()
    private_model, private_optimizer, private_loader = dpcompile.dp_compile(
        model, optimizer, loader, target_epsilon=args.epsilon, target_delta=args.delta,
        epochs=args.epochs, max_grad_norm=args.max_grad_norm, backend=args.backend,
    )
    compile_seconds = time.perf_counter() - start
    privacy = private_model.privacy
    say(
        f"dp_compile: {compile_seconds:.1f} s (trace, rewrite, {args.backend}); "
        f"noise multiplier {privacy.noise_multiplier:.3f} for ε={args.epsilon} at δ={args.delta}, "
        f"sample rate {privacy.sample_rate:.4f}"
    )
    history = train(private_model, private_optimizer, private_loader, args.epochs, "private", test_set,
                    lambda e: f"  ε = {privacy.epsilon(args.delta):.2f}", verbose=verbose, device=device)
    if not verbose:
        return 0
    assert base_history is not None
    print()
    print(f"| run | test accuracy | ε (δ={args.delta:g}) | mean s / epoch |")
    print("|---|---|---|---|")
    mean = lambda h: sum(r["seconds"] for r in h[1:] or h) / len(h[1:] or h)  # noqa: E731
    print(f"| non-private | {base_history[-1]['accuracy']:.2%} | ∞ | {mean(base_history):.3f} |")
    print(f"| dpcompile | {history[-1]['accuracy']:.2%} | {privacy.epsilon(args.delta):.2f} | {mean(history):.3f} |")
    print(f"compiled graph pairs over {args.epochs} epochs of Poisson batches: {private_model.compiled_graph_count}")
    return 0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "digits", help="train a CNN on scikit-learn's digits, privately and not, side by side",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--epsilon", type=float, default=3.0, help="target ε (default 3)")
    parser.add_argument("--delta", type=float, default=1e-5, help="target δ (default 1e-5)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--backend", choices=["inductor", "eager"], default="inductor")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(run=main)
