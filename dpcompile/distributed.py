"""Distributed private training on torch.distributed: one DP-SGD step for the whole job.

Every rank runs the compiled private backward on its own Poisson shard and accumulates its
clipped sums locally (physical batches included). On the last physical batch of a logical step:

1. one small all-reduce (the *control* message) tells every rank whether any rank refused the
   step (non-finite gradient, budget, buffer check) — so either every rank steps or none does,
   and no rank is left waiting in a collective — and sums the adaptive-clipping count;
2. rank 0 alone adds the Gaussian noise ``N(0, σ²C²)`` to its clipped sums, bucket by bucket,
   and every rank all-reduces (sums) the buckets asynchronously, so rank 0 draws the next
   bucket's noise while the previous one is on the wire. The sum is the job's clipped sum plus
   noise drawn exactly once;
3. every rank divides by the expected *global* batch size ``q·N`` and runs its optimizer on the
   identical result, so parameters stay bit-identical.

The compiled backward emits all clipped sums at its end (one graph), so communication overlaps
noise generation, not the backward itself.

Sampling: every rank draws the whole job's Poisson inclusion mask for step ``t`` from a
generator seeded by (job seed, t), agreed at ``dp_compile`` time, and keeps the samples of its
shard (index ``i`` with ``i % world_size == rank``). Shards are disjoint, their union is a
Poisson batch of the whole data set at rate q, and the global stream of batches depends only on
the seed and the step, not on the world size: a checkpoint resumes on any world size. With
``secure_mode`` each rank draws its shard's inclusions from ``os.urandom`` instead.

Before any step ``dp_compile`` checks, with one all-gather, that every rank has the same model
(parameter names, shapes, dtypes and values, buffers) and the same privacy settings; a mismatch
raises the same :class:`DistributedSetupError` on every rank.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dpcompile.data import PoissonBatchSampler, secure_poisson_indices

__all__ = ["DistributedJob", "DistributedSetupError", "DistributedStepRefused",
           "ShardedPoissonBatchSampler", "distributed_job"]

# Gradient buckets of about 25 MB, as DistributedDataParallel's default.
BUCKET_BYTES = 25 * 2**20


class DistributedSetupError(RuntimeError):
    """The ranks of a distributed job disagree (model, settings) or it is not set up."""


class DistributedStepRefused(RuntimeError):
    """Another rank refused this logical step; no rank updated anything."""


@dataclass
class DistributedJob:
    """The process group a dp_compiled model trains in, and this process's place in it."""

    group: Any  # a torch.distributed ProcessGroup; None means the default group
    rank: int
    world_size: int
    device: torch.device  # where collective tensors live (cuda for NCCL, cpu otherwise)
    seed: int = 0  # the job's sampling seed, agreed at dp_compile time
    bucket_bytes: int = BUCKET_BYTES

    # ---- collectives ----------------------------------------------------------------------
    def all_gather(self, value: Any) -> list[Any]:
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.group)
        return gathered

    def agree(self, refused: bool, count: float) -> tuple[list[int], float]:
        """The control message of a step: which ranks refused it, and the sum of ``count``."""
        import torch.distributed as dist

        message = torch.zeros(self.world_size + 1, dtype=torch.float64, device=self.device)
        message[self.rank] = float(refused)
        message[-1] = count
        dist.all_reduce(message, group=self.group)
        values = message.tolist()
        return [r for r in range(self.world_size) if values[r] > 0], values[-1]

    def sum_across_ranks(self, tensors: list[torch.Tensor],
                         before_send: Callable[[list[torch.Tensor]], None] | None = None) -> list[torch.Tensor]:
        """Every tensor's sum over the ranks (views into the flat buckets that were all-reduced).

        ``before_send`` runs on each bucket's tensors just before that bucket is sent (rank 0
        adds its noise there, in place), so it overlaps the previous buckets' communication.
        """
        import torch.distributed as dist

        pending = []
        for members in self._buckets(tensors):
            chosen = [tensors[k] for k in members]
            if before_send is not None:
                before_send(chosen)
            flat = torch.cat([t.reshape(-1) for t in chosen]).to(self.device)
            pending.append((members, flat, dist.all_reduce(flat, group=self.group, async_op=True)))
        summed: list[torch.Tensor] = list(tensors)
        for members, flat, work in pending:
            work.wait()
            pieces = flat.split([tensors[k].numel() for k in members])
            for k, piece in zip(members, pieces):
                summed[k] = piece.view_as(tensors[k]).to(tensors[k].device)
        return summed

    def _buckets(self, tensors: list[torch.Tensor]) -> list[list[int]]:
        """Indices of ``tensors`` grouped by (device, dtype), each group cut at ``bucket_bytes``."""
        buckets: list[list[int]] = []
        open_bucket: dict[tuple[torch.device, torch.dtype], tuple[list[int], int]] = {}
        for k, t in enumerate(tensors):
            key = (t.device, t.dtype)
            members, size = open_bucket.get(key, ([], 0))
            if members and size + t.numel() * t.element_size() > self.bucket_bytes:
                buckets.append(members)
                members, size = [], 0
            members.append(k)
            open_bucket[key] = (members, size + t.numel() * t.element_size())
        buckets += [members for members, _ in open_bucket.values() if members]
        return buckets

    # ---- set-up checks ----------------------------------------------------------------------
    def check_same_job(self, module: nn.Module, settings: dict[str, Any]) -> None:
        """Raise the same DistributedSetupError on every rank unless all ranks have the same
        model and privacy settings; agree on rank 0's sampling seed."""
        mine = {"model": model_fingerprint(module), "settings": settings,
                "seed": int(torch.empty((), dtype=torch.int64).random_())}
        everyone = self.all_gather(mine)
        reference = everyone[0]
        problems = []
        for rank, theirs in enumerate(everyone[1:], start=1):
            problems += _differences(rank, reference, theirs)
        if problems:
            raise DistributedSetupError(
                "the ranks of this distributed job disagree, so a private step would not be one "
                "DP-SGD step:\n  " + "\n  ".join(problems) + "\nEvery rank must build the same "
                "model (wrap it in DistributedDataParallel, which copies rank 0's parameters, or "
                "seed every rank alike) and call dp_compile with the same arguments"
            )
        self.seed = int(reference["seed"]) % 2**63


def model_fingerprint(module: nn.Module) -> dict[str, Any]:
    """Parameter names, shapes, dtypes and trainability, and a digest of parameter and buffer
    values."""
    digest = hashlib.sha256()
    layout = []
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        layout.append((name, tuple(tensor.shape), str(tensor.dtype), bool(tensor.requires_grad)))
        data = tensor.detach().to("cpu").reshape(-1).contiguous()
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return {"layout": layout, "values": digest.hexdigest()}


def _differences(rank: int, reference: dict[str, Any], theirs: dict[str, Any]) -> list[str]:
    problems = []
    ours_layout, their_layout = reference["model"]["layout"], theirs["model"]["layout"]
    if ours_layout != their_layout:
        first = next((f"{a} vs {b}" for a, b in zip(ours_layout, their_layout) if a != b),
                     f"{len(ours_layout)} vs {len(their_layout)} tensors")
        problems.append(f"rank {rank}'s model has other parameters or buffers than rank 0's "
                        f"(rank 0 vs rank {rank}: {first})")
    elif reference["model"]["values"] != theirs["model"]["values"]:
        problems.append(f"rank {rank}'s parameter or buffer values differ from rank 0's")
    for key in sorted(set(reference["settings"]) | set(theirs["settings"])):
        a, b = reference["settings"].get(key), theirs["settings"].get(key)
        if a != b:
            problems.append(f"rank {rank} has {key}={b!r}, rank 0 has {key}={a!r}")
    return problems


# ---- set-up ---------------------------------------------------------------------------------


def distributed_job(model: nn.Module, distributed: bool | None,
                    process_group: Any = None) -> tuple[nn.Module, DistributedJob | None]:
    """The module to compile and the job it trains in (None for a single process).

    A model wrapped in DistributedDataParallel is unwrapped: dpcompile computes, sums and noises
    the gradients itself, so DDP's reducer never runs.
    """
    from torch.nn.parallel import DistributedDataParallel

    _refuse_sharded(model)
    # Opacus's DPDDP wrapper (rank 0's parameters broadcast at construction) counts as DDP.
    wrapped = isinstance(model, DistributedDataParallel) or (
        type(model).__name__ == "DifferentiallyPrivateDistributedDataParallel")
    if wrapped and distributed is False:
        raise ValueError(
            "the model is wrapped in DistributedDataParallel but distributed=False: pass "
            "distributed=True (or leave it unset) to train one private model across the ranks, "
            "or pass model.module to train a separate private model on each rank"
        )
    if not wrapped and not distributed:
        return model, None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise DistributedSetupError(
            "distributed=True, but torch.distributed's default process group is not initialised: "
            "call torch.distributed.init_process_group() first (torchrun sets its environment: "
            "torchrun --nproc-per-node 2 train.py), or drop distributed=True for one process"
        )
    group: Any
    module: nn.Module
    if wrapped:
        group = process_group if process_group is not None else getattr(model, "process_group", None)
        module = model.module  # type: ignore[assignment]
    else:
        group, module = process_group, model
    backend = dist.get_backend(group)
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    return module, DistributedJob(group=group, rank=rank, world_size=world, device=device)


def _refuse_sharded(model: nn.Module) -> None:
    """FSDP shards parameters across ranks; per-sample clipping needs each whole gradient."""
    names = {type(m).__name__ for m in model.modules()} | {c.__name__ for c in type(model).__mro__}
    if names & {"FullyShardedDataParallel", "FSDPModule"}:
        raise NotImplementedError(
            "dp_compile does not support FSDP: each sample's gradient norm needs every "
            "parameter's whole per-sample gradient on one rank, which sharded parameters split "
            "across ranks. Use DistributedDataParallel (every rank holds the whole model)"
        )


# ---- sampling ---------------------------------------------------------------------------------


class ShardedPoissonBatchSampler(PoissonBatchSampler):
    """This rank's part of a Poisson batch of the whole data set.

    Step ``t`` includes every sample of the data set independently with probability q, from a
    generator seeded by ``(seed, t)``; this rank keeps the indices ``i % world_size == rank``.
    """

    def __init__(self, num_samples: int, sample_rate: float, steps: int | None = None, *,
                 rank: int, world_size: int, seed: int, secure: bool = False) -> None:
        super().__init__(num_samples, sample_rate, steps, None, secure=secure)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside a world of {world_size}")
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.next_draw = 0  # steps drawn so far: the position in the job's stream

    def draw(self) -> list[int]:
        if self.secure:
            shard = torch.arange(self.rank, self.num_samples, self.world_size)
            return shard[secure_poisson_indices(len(shard), self.sample_rate)].tolist()
        generator = torch.Generator().manual_seed(stream_seed(self.seed, self.next_draw))
        self.next_draw += 1
        joined = torch.nonzero(torch.rand(self.num_samples, generator=generator) < self.sample_rate)
        joined = joined.reshape(-1)
        return joined[joined % self.world_size == self.rank].tolist()

    def prepare(self) -> None:
        pass  # the stream is (seed, step); nothing to create

    def stream_state(self) -> tuple[Any, torch.Tensor | None]:
        return None, torch.tensor(self.next_draw)

    def rewind(self, consumed: tuple[Any, torch.Tensor | None]) -> None:
        if consumed[1] is not None:
            self.next_draw = int(consumed[1])


def stream_seed(seed: int, step: int) -> int:
    """The generator seed of one step of a job's sample stream."""
    digest = hashlib.blake2b(f"{seed}:{step}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**63


def local_expected_batch_size(expected_batch_size: float, job: DistributedJob | None) -> float:
    """Samples one rank sees per step on average (what its compiled batch sizes are sized for)."""
    if job is None:
        return expected_batch_size
    return max(1.0, expected_batch_size / job.world_size)


def steps_per_epoch(sample_rate: float) -> int:
    """Logical steps in one pass over the data set on average."""
    return max(1, math.ceil(1 / sample_rate - 1e-9))
