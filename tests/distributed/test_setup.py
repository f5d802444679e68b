"""Distributed set-up without processes: errors, and the sharded Poisson sampler's statistics."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import dpcompile
from dpcompile.distributed import DistributedJob, ShardedPoissonBatchSampler
from tests.distributed.workers import build_data, build_model


def test_distributed_without_a_process_group_is_a_clear_error() -> None:
    model = build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(dpcompile.DistributedSetupError, match="init_process_group"):
        dpcompile.dp_compile(model, opt, DataLoader(build_data(), batch_size=6),
                             noise_multiplier=1.0, backend="eager", distributed=True)


@pytest.mark.parametrize("world", [2, 3])
def test_shards_are_disjoint_and_union_is_the_world_size_independent_stream(world: int) -> None:
    samplers = [ShardedPoissonBatchSampler(50, 0.3, rank=r, world_size=world, seed=7) for r in range(world)]
    alone = ShardedPoissonBatchSampler(50, 0.3, rank=0, world_size=1, seed=7)
    for _ in range(20):
        parts = [s.draw() for s in samplers]
        assert all(i % world == r for r, part in enumerate(parts) for i in part)
        union = sorted(i for part in parts for i in part)
        assert len(union) == len(set(union))
        assert union == sorted(alone.draw())


def test_union_of_shards_is_poisson_at_rate_q() -> None:
    n, q, steps, world = 200, 0.1, 3000, 2
    samplers = [ShardedPoissonBatchSampler(n, q, rank=r, world_size=world, seed=11) for r in range(world)]
    sizes, counts = [], torch.zeros(n)
    for _ in range(steps):
        union = [i for s in samplers for i in s.draw()]
        sizes.append(len(union))
        counts[union] += 1
    sizes_t = torch.tensor(sizes, dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert abs(sizes_t.mean().item() - mean) < 4 * math.sqrt(var / steps)
    assert sizes_t.var().item() == pytest.approx(var, rel=0.12)
    # Each sample joins with probability q: per-sample frequencies within 5 binomial std devs.
    freq = counts / steps
    assert (freq - q).abs().max().item() < 5 * math.sqrt(q * (1 - q) / steps)


def test_secure_shards_are_disjoint() -> None:
    samplers = [ShardedPoissonBatchSampler(40, 0.5, rank=r, world_size=2, seed=0, secure=True) for r in range(2)]
    for _ in range(10):
        a, b = (s.draw() for s in samplers)
        assert all(i % 2 == 0 for i in a) and all(i % 2 == 1 for i in b)


def test_stream_rewinds_to_the_batches_actually_used() -> None:
    sampler = ShardedPoissonBatchSampler(30, 0.4, steps=5, rank=1, world_size=2, seed=3)
    drawn = []
    for batch in sampler:
        drawn.append((batch, sampler.drawn_states[-1]))
    sampler.rewind(drawn[1][1])
    assert sampler.draw() == drawn[2][0]


def test_buckets_group_by_dtype_and_size() -> None:
    job = DistributedJob(group=None, rank=0, world_size=2, device=torch.device("cpu"), bucket_bytes=64)
    tensors = [torch.zeros(4), torch.zeros(4, dtype=torch.float64), torch.zeros(12), torch.zeros(2)]
    buckets = job._buckets(tensors)
    assert sorted(k for b in buckets for k in b) == [0, 1, 2, 3]
    for bucket in buckets:
        assert len({tensors[k].dtype for k in bucket}) == 1
        assert len(bucket) == 1 or sum(tensors[k].numel() * tensors[k].element_size() for k in bucket) <= 64


def _job(rank: int = 0, world: int = 2) -> DistributedJob:
    return DistributedJob(group=None, rank=rank, world_size=world, device=torch.device("cpu"))


def test_a_distributed_sampler_counts_its_replicas_in_the_sample_rate() -> None:
    from dpcompile.api import _replicas, _sample_rate

    data = build_data()  # 48 samples
    loader = DataLoader(data, batch_size=6, sampler=DistributedSampler(data, num_replicas=2, rank=0))
    # Each of the 24 samples of this process's part is in one of its batches of 6 per epoch.
    q = _sample_rate(loader, None, len(data), len(loader), False, _replicas(loader, 1))
    assert q == pytest.approx(12 / 48)


def test_fixed_batches_across_ranks_must_partition_the_data() -> None:
    from dpcompile.api import _check_disjoint_fixed_batches

    data = build_data()
    with pytest.raises(ValueError, match="needs a DistributedSampler"):
        _check_disjoint_fixed_batches(DataLoader(data, batch_size=6, shuffle=True), _job(), 48)
    wrong_rank = DataLoader(data, batch_size=6, sampler=DistributedSampler(data, num_replicas=2, rank=1))
    with pytest.raises(ValueError, match="needs a DistributedSampler"):
        _check_disjoint_fixed_batches(wrong_rank, _job(rank=0), 48)
    odd = build_data(47)
    padded = DataLoader(odd, batch_size=6, sampler=DistributedSampler(odd, num_replicas=2, rank=0))
    with pytest.raises(ValueError, match="drop_last=True"):
        _check_disjoint_fixed_batches(padded, _job(), 47)
    dropped = DataLoader(odd, batch_size=6,
                         sampler=DistributedSampler(odd, num_replicas=2, rank=0, drop_last=True))
    _check_disjoint_fixed_batches(dropped, _job(), 47)
