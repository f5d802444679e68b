"""Poisson sampling and physical batches.

DP-SGD's accounting assumes every sample joins a step independently with probability q
(Poisson sampling), so batch sizes vary and some batches are empty; empty batches still make a
step (noise only). :class:`DPDataLoader` draws such logical batches from the user's dataset with
the user's collate function and workers, and splits a logical batch larger than
``max_physical_batch_size`` into physical batches: the optimizer accumulates the physical
batches and takes one noisy step per logical batch.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils.data.dataloader import _collate_fn_t


class StepSignal:
    """Tells the optimizer whether the batch just handed out ends a logical batch."""

    def __init__(self) -> None:
        self.end_of_logical_batch = True
        self.logical_batch_size = 0  # realized size of the current logical batch


class PoissonBatchSampler(Sampler[list[int]]):
    """Each of ``num_samples`` indices joins each batch independently with probability q."""

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, int(1 / sample_rate))
        self.generator = generator

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.steps):
            draws = torch.rand(self.num_samples, generator=self.generator)
            yield torch.nonzero(draws < self.sample_rate).reshape(-1).tolist()


def secure_generator() -> torch.Generator:
    """A CPU generator seeded from the operating system's CSPRNG."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(63))
    return generator


class _EmptyAwareCollate:
    """Collates a batch; an empty batch becomes tensors with zero rows and the right shapes."""

    def __init__(self, collate_fn: _collate_fn_t, example: Any) -> None:
        self.collate_fn = collate_fn
        self.empty = tree_map(
            lambda t: t[:0] if isinstance(t, torch.Tensor) and t.dim() > 0 else t,
            collate_fn([example]),
        )

    def __call__(self, batch: list[Any]) -> Any:
        if len(batch) == 0:
            return tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, self.empty)
        return self.collate_fn(batch)


def batch_size_of(batch: Any) -> int:
    leaves, _ = tree_flatten(batch)
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor) and leaf.dim() > 0:
            return int(leaf.shape[0])
    raise ValueError("a batch must contain at least one tensor with a batch dimension")


def split_batch(batch: Any, size: int) -> list[Any]:
    """Split every tensor of a (nested) batch along dim 0 into chunks of at most ``size``."""
    leaves, spec = tree_flatten(batch)
    total = batch_size_of(batch)
    if total <= size:
        return [batch]
    chunks = []
    for start in range(0, total, size):
        part = [
            leaf[start : start + size] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0 else leaf
            for leaf in leaves
        ]
        chunks.append(tree_unflatten(part, spec))
    return chunks


class DPDataLoader(DataLoader):
    """A DataLoader with Poisson sampling (and physical batches, if asked) over a dataset.

    Iterating yields one batch per physical batch; ``signal.end_of_logical_batch`` is true when
    the batch just yielded completes a logical batch.
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, collate_fn: _collate_fn_t | None = None,
                 max_physical_batch_size: int | None = None, generator: torch.Generator | None = None,
                 steps: int | None = None, signal: StepSignal | None = None, **kwargs: Any) -> None:
        num_samples = len(dataset)  # type: ignore[arg-type]
        sampler = PoissonBatchSampler(num_samples, sample_rate, steps, generator)
        base_collate = collate_fn if collate_fn is not None else default_collate
        super().__init__(dataset, batch_sampler=sampler,
                         collate_fn=_EmptyAwareCollate(base_collate, dataset[0]), **kwargs)
        self.sample_rate = sample_rate
        self.max_physical_batch_size = max_physical_batch_size
        self.signal = signal if signal is not None else StepSignal()

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        for logical in super().__iter__():
            size = batch_size_of(logical)
            self.signal.logical_batch_size = size
            if self.max_physical_batch_size is None:
                self.signal.end_of_logical_batch = True
                yield logical
                continue
            chunks = split_batch(logical, self.max_physical_batch_size)
            for k, chunk in enumerate(chunks):
                self.signal.end_of_logical_batch = k == len(chunks) - 1
                yield chunk
        self.signal.end_of_logical_batch = True


class PhysicalBatches:
    """Wraps a non-Poisson loader to split its batches into physical batches as well."""

    def __init__(self, loader: Any, max_physical_batch_size: int | None, signal: StepSignal) -> None:
        self.loader = loader
        self.max_physical_batch_size = max_physical_batch_size
        self.signal = signal

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for logical in self.loader:
            self.signal.logical_batch_size = batch_size_of(logical)
            limit = self.max_physical_batch_size or math.inf
            chunks = split_batch(logical, int(limit)) if limit != math.inf else [logical]
            for k, chunk in enumerate(chunks):
                self.signal.end_of_logical_batch = k == len(chunks) - 1
                yield chunk
        self.signal.end_of_logical_batch = True
