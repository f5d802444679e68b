"""The accountant's assumptions are enforced: Poisson sampling, uniform inclusion, the true rate."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    RandomSampler,
    SequentialSampler,
    SubsetRandomSampler,
    TensorDataset,
    WeightedRandomSampler,
)

import dpcompile

D = torch.float64
N = 40


def data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 4, generator=g, dtype=D), torch.randint(0, 2, (N,), generator=g))


def compile_with(loader, **kwargs):
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(D)
    kwargs.setdefault("noise_multiplier", 1.0)
    return dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader,
                                backend="eager", accountant="rdp", **kwargs)


def test_poisson_sampling_false_warns():
    with pytest.warns(dpcompile.PoissonSamplingWarning, match="assumes Poisson sampling"):
        compile_with(DataLoader(data(), batch_size=8, shuffle=True), poisson_sampling=False)


@pytest.mark.parametrize("poisson", [True, False])
@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: dict(sampler=WeightedRandomSampler([1.0] * 39 + [50.0], N)), "WeightedRandomSampler"),
        (lambda: dict(sampler=SubsetRandomSampler(range(20))), "SubsetRandomSampler"),
        (lambda: dict(sampler=RandomSampler(range(N), replacement=True)), "replacement"),
        (lambda: dict(batch_sampler=[[0, 1], [2, 3]], batch_size=None), "custom batch_sampler"),
    ],
)
def test_samplers_that_change_inclusion_probabilities_are_refused(make, match, poisson):
    kwargs = make()
    kwargs.setdefault("batch_size", 8)
    if "batch_sampler" in kwargs:
        kwargs.pop("batch_size")
    loader = DataLoader(data(), **kwargs)
    with pytest.raises(ValueError, match=match) as info:
        compile_with(loader, poisson_sampling=poisson)
    assert ("silently drop" in str(info.value)) == poisson


@pytest.mark.parametrize("sampler", [None, "random", "sequential", "batch"])
def test_uniform_samplers_are_accepted(sampler):
    if sampler == "random":
        loader = DataLoader(data(), batch_size=8, shuffle=True)
    elif sampler == "sequential":
        loader = DataLoader(data(), batch_size=8, sampler=SequentialSampler(range(N)))
    elif sampler == "batch":
        loader = DataLoader(data(), batch_sampler=BatchSampler(RandomSampler(range(N)), 8, False))
    else:
        loader = DataLoader(data(), batch_size=8)
    private, _, dl = compile_with(loader)
    assert private.privacy.sample_rate == 8 / N


def test_sample_rate_checks():
    # poisson_sampling=False: the fixed batches include each sample at batch/N; less under-reports ε.
    with pytest.raises(ValueError, match="under-report"):
        compile_with(DataLoader(data(), batch_size=8, shuffle=True), poisson_sampling=False, sample_rate=0.1)
    # Poisson: the loader samples at the given rate; a rate far from the loader's warns.
    with pytest.warns(dpcompile.SampleRateWarning, match="batch_size is ignored"):
        private, _, dl = compile_with(DataLoader(data(), batch_size=8), sample_rate=0.05)
    assert dl.batch_sampler.sample_rate == private.privacy.sample_rate == 0.05
    # Fewer than one expected sample per batch.
    with pytest.raises(ValueError, match="expected batch"), pytest.warns(dpcompile.SampleRateWarning):
        compile_with(DataLoader(data(), batch_size=8), sample_rate=0.01)


def test_the_accountant_records_the_rate_the_loader_samples_at():
    private, opt, dl = compile_with(DataLoader(data(), batch_size=8))
    for x, y in dl:
        opt.zero_grad()
        F.cross_entropy(private(x), y).backward()
        opt.step()
    assert private.privacy.accountant.history == [(1.0, 8 / N, N // 8)]
    assert dl.batch_sampler.sample_rate == 8 / N and dl.batch_sampler.num_samples == N


def test_raising_the_rate_or_resizing_the_dataset_after_dp_compile_is_refused():
    private, opt, dl = compile_with(DataLoader(data(), batch_size=8))
    dl.batch_sampler.sample_rate = 0.5
    with pytest.raises(RuntimeError, match="ε would be too small"):
        next(iter(dl))
    dl.batch_sampler.sample_rate = 0.1  # lower than accounted: conservative, allowed
    next(iter(dl))
    dl.batch_sampler.sample_rate = 0.2
    dataset = dl.dataset
    dataset.tensors = tuple(t[:30] for t in dataset.tensors)
    with pytest.raises(RuntimeError, match="changed size"):
        next(iter(dl))
