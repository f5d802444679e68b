"""max_epsilon: the step that would exceed the budget is refused before anything changes."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from dpcompile.budget import epsilon_after, remaining_steps

D = torch.float64


def setup(max_epsilon=None, accountant="rdp", max_physical_batch_size=None, momentum=0.9, **kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2)).to(D)
    data = TensorDataset(torch.randn(40, 4, dtype=D), torch.randint(0, 2, (40,)))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=momentum)
    private, opt, dl = dpcompile.dp_compile(
        model, opt, DataLoader(data, batch_size=10), noise_multiplier=1.0, max_grad_norm=1.0,
        accountant=accountant, max_epsilon=max_epsilon, backend="eager",
        max_physical_batch_size=max_physical_batch_size,
        noise_generator=torch.Generator().manual_seed(0), **kwargs,
    )
    return model, private, opt, dl


def train_step(private, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(private(x), y).backward()
    opt.step()


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_optimizer_refuses_the_step_that_would_exceed_the_budget(accountant):
    model, private, opt, dl = setup(accountant=accountant)
    privacy = private.privacy
    # A budget that allows exactly 5 steps.
    privacy.max_epsilon = (epsilon_after(privacy, 5) + epsilon_after(privacy, 6)) / 2
    assert remaining_steps(privacy) == 5
    x, y = next(iter(dl))
    for _ in range(5):
        train_step(private, opt, x, y)
    assert privacy.steps == 5 and privacy.epsilon() <= privacy.max_epsilon
    assert privacy.budget_exhausted and privacy.remaining_steps() == 0

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    momentum = {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
    history = privacy.accountant.state_dict()
    opt.zero_grad()
    F.cross_entropy(private(x), y).backward()
    with pytest.raises(dpcompile.PrivacyBudgetExceeded) as info:
        opt.step()
    error = info.value
    assert error.epsilon_after > error.max_epsilon == privacy.max_epsilon and error.steps == 5
    assert "max_epsilon" in str(error) and "refused" in str(error)
    # Nothing moved: parameters, optimizer state, accountant; no unnoised gradient left behind.
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n]) and p.grad is None
    for k, v in opt.state.items():
        assert torch.equal(v["momentum_buffer"], momentum[k])
    assert privacy.accountant.state_dict() == history
    assert not private._engine.accumulator


def test_loader_stops_cleanly_at_the_budget():
    model, private, opt, dl = setup()
    privacy = private.privacy
    privacy.max_epsilon = (epsilon_after(privacy, 7) + epsilon_after(privacy, 8)) / 2
    seen = 0
    with pytest.warns(dpcompile.PrivacyBudgetWarning, match="the data loader stops"):
        for _epoch in range(5):  # 4 steps per epoch; the budget ends in the second
            for x, y in dl:
                train_step(private, opt, x, y)
                seen += 1
    assert seen == 7 and privacy.steps == 7 and dl.budget_exhausted
    assert privacy.epsilon() <= privacy.max_epsilon < epsilon_after(privacy, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per loader
        assert list(dl) == []


def test_virtual_steps_do_not_count_and_stop_at_logical_boundaries():
    model, private, opt, dl = setup(max_physical_batch_size=3)
    privacy = private.privacy
    privacy.max_epsilon = (epsilon_after(privacy, 3) + epsilon_after(privacy, 4)) / 2
    ends = 0
    with pytest.warns(dpcompile.PrivacyBudgetWarning):
        for x, y in dl:
            train_step(private, opt, x, y)
            ends += dl.signal.end_of_logical_batch
    assert ends == 3 and privacy.steps == 3 and dl.signal.end_of_logical_batch


def test_budget_too_small_for_one_step_is_refused_at_compile_time():
    with pytest.raises(ValueError, match="below the ε of a single step"):
        setup(max_epsilon=1e-6)
    with pytest.raises(ValueError, match="max_epsilon must be a finite number > 0"):
        setup(max_epsilon=-1.0)


def test_budget_given_to_dp_compile_and_reported():
    _, private, opt, dl = setup(max_epsilon=8.0)
    assert private.privacy.max_epsilon == 8.0 and "max_epsilon=8" in repr(private.privacy)
    left = private.privacy.remaining_steps()
    assert left > 0
    assert epsilon_after(private.privacy, left) <= 8.0 < epsilon_after(private.privacy, left + 1)
    _, plain, _, _ = setup()
    assert plain.privacy.remaining_steps() is None and not plain.privacy.budget_exhausted


def test_poisson_sampling_false_loader_also_stops():
    torch.manual_seed(0)
    model = nn.Linear(4, 2).to(D)
    data = TensorDataset(torch.randn(40, 4, dtype=D), torch.randint(0, 2, (40,)))
    with pytest.warns(dpcompile.PoissonSamplingWarning):
        private, opt, dl = dpcompile.dp_compile(
            model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=10, shuffle=True),
            noise_multiplier=1.0, accountant="rdp", poisson_sampling=False, backend="eager",
        )
    privacy = private.privacy
    privacy.max_epsilon = (epsilon_after(privacy, 2) + epsilon_after(privacy, 3)) / 2
    with pytest.warns(dpcompile.PrivacyBudgetWarning):
        steps = 0
        for x, y in dl:
            train_step(private, opt, x, y)
            steps += 1
    assert steps == 2 and privacy.steps == 2
