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
import os
import secrets
import warnings
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten
from torch.utils.data import DataLoader, Dataset, Sampler
from torch.utils.data._utils.collate import default_collate
from torch.utils.data.dataloader import _collate_fn_t

from dpcompile.budget import PrivacyBudgetWarning, budget_allows_step, budget_message


class StepSignal:
    """Tells the optimizer whether the batch just handed out ends a logical batch."""

    def __init__(self) -> None:
        self.end_of_logical_batch = True
        self.logical_batch_size = 0  # realized size of the current logical batch


class PoissonBatchSampler(Sampler[list[int]]):
    """Each of ``num_samples`` indices joins each batch independently with probability q.

    Draws come from ``generator`` (torch's global generator if None) or, with ``secure=True``,
    from the operating system's CSPRNG: each inclusion is ``u < ⌊q·2⁶⁴⌋`` for a uniform 64-bit
    ``u`` from ``os.urandom``, so P(included) equals q to within 2⁻⁶⁴ and the draws cannot be
    predicted or replayed from a seed.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None,
                 generator: torch.Generator | None = None, *, secure: bool = False) -> None:
        if num_samples <= 0:
            raise ValueError(f"num_samples must be positive, got {num_samples}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_samples = num_samples
        self.sample_rate = sample_rate
        self.steps = steps if steps is not None else max(1, int(1 / sample_rate))
        self.generator = generator
        self.secure = secure
        self.next_epoch_steps: int | None = None  # a resumed epoch's remaining batches, used once
        # Generator state after each draw, oldest first: the loader pops one per batch it hands
        # out, so it knows the state after the last batch actually used (workers draw ahead).
        self.drawn_states: deque[tuple[Any, torch.Tensor | None]] = deque()

    def __len__(self) -> int:
        return self.steps

    def draw(self) -> list[int]:
        """One Poisson batch: the indices that joined."""
        if self.secure:
            return secure_poisson_indices(self.num_samples, self.sample_rate)
        draws = torch.rand(self.num_samples, generator=self.generator)
        return torch.nonzero(draws < self.sample_rate).reshape(-1).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        steps = self.steps if self.next_epoch_steps is None else self.next_epoch_steps
        self.next_epoch_steps = None
        for _ in range(steps):
            batch = self.draw()
            self.drawn_states.append(self.stream_state())
            yield batch

    def prepare(self) -> None:
        """Before an iteration: create the generator (seeded from torch's global one) if none."""
        if self.generator is None and not self.secure:
            self.generator = seeded_generator()

    def stream_state(self) -> tuple[Any, torch.Tensor | None]:
        """Where the stream of batches stands after the last draw (see ``rewind``)."""
        generator = self.generator
        return generator, generator.get_state() if generator is not None and not self.secure else None

    def rewind(self, consumed: tuple[Any, torch.Tensor | None]) -> None:
        """Return the stream to a ``stream_state()``: draws made ahead and never used are undone."""
        generator, state = consumed
        if generator is not None and generator is self.generator and state is not None:
            self.generator.set_state(state)


def secure_poisson_indices(num_samples: int, sample_rate: float) -> list[int]:
    """Poisson sampling from ``os.urandom``: index k joins iff its uniform 64-bit draw is below
    ⌊q·2⁶⁴⌋."""
    if sample_rate >= 1:
        return list(range(num_samples))
    threshold = np.uint64(int(sample_rate * 2.0**64))
    draws = np.frombuffer(os.urandom(8 * num_samples), dtype=np.uint64)
    return np.nonzero(draws < threshold)[0].tolist()


def secure_generator() -> torch.Generator:
    """A CPU generator seeded with 64 bits from the operating system's CSPRNG."""
    generator = torch.Generator()
    generator.manual_seed(secrets.randbits(64))
    return generator


def seeded_generator() -> torch.Generator:
    """A CPU generator seeded from torch's global generator (so ``torch.manual_seed`` decides it)."""
    seed = int(torch.empty((), dtype=torch.int64).random_())
    return torch.Generator().manual_seed(seed)


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

    Without a generator (and without ``secure``), the sampler gets its own generator at the first
    iteration, seeded from torch's global generator: ``torch.manual_seed`` still decides the
    batches, and other users of the global generator (dropout, augmentation) do not shift them,
    so a checkpoint can continue the exact sample stream.

    With ``privacy`` (set by dp_compile), every logical batch first checks that the sampler still
    samples at most at the accountant's rate from a dataset of the accounted size, and, with a
    privacy budget, that one more step fits in it; when it does not, iteration stops cleanly
    (``budget_exhausted`` becomes true) before any sample is drawn.
    """

    def __init__(self, dataset: Dataset, *, sample_rate: float, collate_fn: _collate_fn_t | None = None,
                 max_physical_batch_size: int | None = None, generator: torch.Generator | None = None,
                 steps: int | None = None, signal: StepSignal | None = None, secure: bool = False,
                 privacy: Any = None, poisson_sampler: PoissonBatchSampler | None = None,
                 **kwargs: Any) -> None:
        num_samples = len(dataset)  # type: ignore[arg-type]
        # A distributed job passes its rank's sampler (dpcompile.distributed).
        sampler = poisson_sampler or PoissonBatchSampler(num_samples, sample_rate, steps, generator,
                                                         secure=secure)
        base_collate = collate_fn if collate_fn is not None else default_collate
        super().__init__(dataset, batch_sampler=sampler,
                         collate_fn=_EmptyAwareCollate(base_collate, dataset[0]), **kwargs)
        self.sample_rate = sample_rate
        self.max_physical_batch_size = max_physical_batch_size
        self.signal = signal if signal is not None else StepSignal()
        self.privacy = privacy
        self.budget_exhausted = False
        self.position = 0  # logical batches handed out in the current epoch
        self.logical_batches = 0  # logical batches handed out in total
        # (generator, state) after the last logical batch handed out
        self.consumed_state: tuple[Any, torch.Tensor | None] | None = None

    @property
    def expected_batch_size(self) -> float:
        return self.sample_rate * len(self.dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        sampler: PoissonBatchSampler = self.batch_sampler  # type: ignore[assignment]
        sampler.prepare()
        if self.consumed_state is not None:
            # Draws a previous iterator made ahead (workers prefetch) but never handed out are
            # forgotten: the stream is defined by the batches actually used.
            sampler.rewind(self.consumed_state)
        sampler.drawn_states.clear()
        resumed = sampler.next_epoch_steps
        self.position = 0 if resumed is None else max(0, sampler.steps - resumed)
        batches = super().__iter__()
        while True:
            if not self._may_draw():
                return
            try:
                logical = next(batches)
            except StopIteration:
                break
            if sampler.drawn_states:
                self.consumed_state = sampler.drawn_states.popleft()
            self.position += 1
            self.logical_batches += 1
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
        self.position = 0
        self.signal.end_of_logical_batch = True

    def _may_draw(self) -> bool:
        """Check the accounting assumptions and the budget before drawing a logical batch."""
        if self.privacy is None:
            return True
        check_sampling(self.privacy, self.batch_sampler, len(self.dataset))  # type: ignore[arg-type]
        if not budget_allows_step(self.privacy):
            self.signal.end_of_logical_batch = True
            if not self.budget_exhausted:
                self.budget_exhausted = True
                warnings.warn(budget_message(self.privacy, "the data loader stops"),
                              PrivacyBudgetWarning, stacklevel=3)
            return False
        return True


def check_sampling(privacy: Any, sampler: Any, dataset_size: int) -> None:
    """The sampler must match what the accountant assumes: rate ≤ the accounted q, same N."""
    if dataset_size != privacy.dataset_size or getattr(sampler, "num_samples", dataset_size) != dataset_size:
        raise RuntimeError(
            f"the dataset has {dataset_size} samples but the privacy accounting (and the "
            f"division by the expected batch size) assumes {privacy.dataset_size}: the dataset "
            "changed size after dp_compile; call dp_compile again with the new dataset"
        )
    rate = getattr(sampler, "sample_rate", None)
    if rate is not None and rate > privacy.sample_rate * (1 + 1e-12):
        raise RuntimeError(
            f"the loader samples at rate {rate:g} but the accountant accounts sample_rate="
            f"{privacy.sample_rate:g}: the reported ε would be too small. Do not change the "
            "sampler's rate after dp_compile"
        )


class PhysicalBatches:
    """Wraps a non-Poisson loader to split its batches into physical batches as well."""

    def __init__(self, loader: Any, max_physical_batch_size: int | None, signal: StepSignal,
                 privacy: Any = None) -> None:
        self.loader = loader
        self.max_physical_batch_size = max_physical_batch_size
        self.signal = signal
        self.privacy = privacy
        self.budget_exhausted = False

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def __iter__(self) -> Iterator[Any]:
        for logical in self.loader:
            if self.privacy is not None and not budget_allows_step(self.privacy):
                self.signal.end_of_logical_batch = True
                if not self.budget_exhausted:
                    self.budget_exhausted = True
                    warnings.warn(budget_message(self.privacy, "the data loader stops"),
                                  PrivacyBudgetWarning, stacklevel=2)
                return
            self.signal.logical_batch_size = batch_size_of(logical)
            limit = self.max_physical_batch_size or math.inf
            chunks = split_batch(logical, int(limit)) if limit != math.inf else [logical]
            for k, chunk in enumerate(chunks):
                self.signal.end_of_logical_batch = k == len(chunks) - 1
                yield chunk
        self.signal.end_of_logical_batch = True
