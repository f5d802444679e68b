"""dpcompile.validate / dpcompile.fix: every problem reported with a fix; dp_compile refuses."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from passes import SampleMixingError

D = torch.float64


class RunningMean(nn.Module):
    """A custom layer that keeps a running mean of its inputs: a data-dependent buffer update."""

    def __init__(self, d=4):
        super().__init__()
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        out = x * 1.0
        if self.training:
            with torch.no_grad():
                self.mean.mul_(0.9).add_(0.1 * x.mean(0))
        return out


class Counter(nn.Module):
    """Counts forward calls: a buffer update that does not depend on the data (harmless)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.calls.add_(1)
        return x


class BatchCentered(nn.Module):
    """Subtracts the batch mean: mixes samples without any normalization module."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


def loader(d=4, n=20):
    g = torch.Generator().manual_seed(0)
    return DataLoader(TensorDataset(torch.randn(n, d, generator=g, dtype=D),
                                    torch.randint(0, 2, (n,), generator=g)), batch_size=5)


def test_clean_model_has_no_problems():
    model = nn.Sequential(nn.Linear(4, 8), nn.GroupNorm(2, 8), nn.ReLU(), nn.Linear(8, 2))
    assert dpcompile.validate(model) == []
    assert dpcompile.validate(model, torch.randn(3, 4)) == []


def test_every_problem_is_listed_with_a_fix():
    model = nn.Sequential(
        nn.Linear(4, 4), nn.BatchNorm1d(4), RunningMean(4), nn.Linear(4, 4),
        nn.InstanceNorm1d(4, track_running_stats=True), BatchCentered(), nn.Linear(4, 2),
    )
    model[4] = nn.Identity()  # InstanceNorm1d needs (B, C, L); its structural check is below
    problems = dpcompile.validate(model, torch.randn(6, 4))
    kinds = {(p.module, p.kind) for p in problems}
    assert ("1", "batchnorm") in kinds
    assert ("2", "buffer_update") in kinds
    assert ("5", "sample_mixing") in kinds  # found by the compiler although BatchNorm comes first
    for p in problems:
        assert p.fix and p.message
        assert str(p).startswith(f"`{p.module}`")
    # Without an example input: the module tree only.
    assert {p.kind for p in dpcompile.validate(model)} == {"batchnorm"}
    # The model was not modified (sandbox copy).
    assert torch.equal(model[2].mean, torch.zeros(4)) and model.training


def test_structural_checks():
    model = nn.Sequential(nn.Conv1d(1, 4, 3), nn.InstanceNorm1d(4, track_running_stats=True),
                          nn.SyncBatchNorm(4), nn.LazyLinear(2))
    problems = dpcompile.validate(model)
    assert [(p.module, p.kind) for p in problems] == [
        ("1", "running_stats"), ("2", "batchnorm"), ("3", "uninitialized")
    ]
    frozen = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    (problem,) = dpcompile.validate(frozen)
    assert "eval mode" in problem.message and "model.train()" in problem.message


def test_counter_buffers_are_fine():
    model = nn.Sequential(nn.Linear(4, 4), Counter(), nn.Linear(4, 2))
    assert dpcompile.validate(model, torch.randn(3, 4)) == []


def test_dp_compile_lists_every_structural_problem_and_changes_nothing():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.BatchNorm1d(4),
                          nn.Linear(4, 2)).to(D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dpcompile.ModelValidationError) as info:
        dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(),
                             noise_multiplier=1.0, backend="eager")
    assert isinstance(info.value, SampleMixingError)
    assert [p.module for p in info.value.problems] == ["1", "3"]
    assert "`1`" in str(info.value) and "`3`" in str(info.value) and "GroupNorm" in str(info.value)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_dp_compile_refuses_buffers_updated_from_the_batch():
    model = nn.Sequential(nn.Linear(4, 4), RunningMean(4), nn.Linear(4, 2)).to(D)
    with pytest.raises(dpcompile.ModelValidationError, match="overwrites buffer `mean`"):
        dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1), loader(),
                             noise_multiplier=1.0, backend="eager")
    # Compiling ran the forward; the buffer it touched was restored.
    assert torch.equal(model[1].mean, torch.zeros(4, dtype=D))


def test_buffer_check_when_compiling_waits_for_the_first_batch():
    """When dp_compile cannot guess the inputs, the first optimizer step checks the graph."""

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 4), RunningMean(4), nn.Linear(4, 2))

        def forward(self, batch):  # a dict input: the warm-up cannot guess it
            return self.net(batch["x"])

    class Dicts(torch.utils.data.Dataset):
        def __init__(self):
            self.x = torch.randn(20, 4, dtype=D)

        def __len__(self):
            return 20

        def __getitem__(self, k):
            return {"x": self.x[k], "y": k % 2}

    model = Wrapped().to(D)
    private, opt, dl = dpcompile.dp_compile(model, torch.optim.SGD(model.parameters(), lr=0.1),
                                            DataLoader(Dicts(), batch_size=5), noise_multiplier=1.0,
                                            backend="eager")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = next(iter(dl))
    F.cross_entropy(private(batch), batch["y"]).backward()
    with pytest.raises(dpcompile.ModelValidationError, match="buffer `mean`"):
        opt.step()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) and p.grad is None
    assert private.privacy.steps == 0


def test_fix_replaces_batchnorm_with_groupnorm():
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.ReLU(),
        nn.Conv2d(64, 48, 3), nn.BatchNorm2d(48), nn.Conv2d(48, 10, 1), nn.BatchNorm2d(10),
        nn.Flatten(), nn.LazyLinear(3),
    ).to(D)
    with torch.no_grad():
        model[1].weight.fill_(2.0)
        model(torch.randn(2, 3, 8, 8, dtype=D))  # initialize the lazy layer
    fixed, changes = dpcompile.fix(model)
    assert [(c.module, c.after) for c in changes] == [
        ("1", "GroupNorm(32, 64)"), ("4", "GroupNorm(16, 48)"), ("6", "GroupNorm(2, 10)")
    ]
    assert isinstance(model[1], nn.BatchNorm2d)  # the original is untouched
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].weight.dtype == D
    assert torch.equal(fixed[1].weight, torch.full((64,), 2.0, dtype=D))
    assert dpcompile.validate(fixed, torch.randn(3, 3, 8, 8, dtype=D)) == []
    assert "BatchNorm2d(64) -> GroupNorm(32, 64)" in str(changes[0])


def test_fix_handles_top_level_shared_and_instance_norm():
    fixed, changes = dpcompile.fix(nn.BatchNorm1d(12))
    assert isinstance(fixed, nn.GroupNorm) and fixed.num_groups == 4 and len(changes) == 1
    shared = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), shared, nn.Linear(4, 4), shared)
    fixed, changes = dpcompile.fix(model)
    assert fixed[1] is fixed[3] and isinstance(fixed[1], nn.GroupNorm) and len(changes) == 1
    fixed, changes = dpcompile.fix(nn.Sequential(nn.InstanceNorm1d(4, affine=True, track_running_stats=True)))
    assert not fixed[0].track_running_stats and fixed[0].affine
    assert dpcompile.validate(fixed) == []


def test_fixed_model_trains_privately():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(D)
    fixed, _ = dpcompile.fix(model)
    private, opt, dl = dpcompile.dp_compile(fixed, torch.optim.SGD(fixed.parameters(), lr=0.1),
                                            loader(), noise_multiplier=1.0, backend="eager")
    for x, y in dl:
        opt.zero_grad()
        F.cross_entropy(private(x), y).backward()
        opt.step()
    assert private.privacy.steps == len(dl)


def test_passing_the_fix_tuple_is_a_clear_error():
    model = nn.Sequential(nn.Linear(4, 2))
    with pytest.raises(TypeError, match=r"dpcompile.fix\(model\) returns"):
        dpcompile.dp_compile(dpcompile.fix(model), torch.optim.SGD(model.parameters(), lr=0.1),
                             loader(), noise_multiplier=1.0)
