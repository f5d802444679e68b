"""Bad arguments fail before any training step and leave the model and optimizer untouched."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, TensorDataset

import dpcompile
from passes import SampleMixingError


def setup(model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(TensorDataset(torch.randn(20, 4), torch.randint(0, 2, (20,))), batch_size=5)
    return model, optimizer, loader


def snapshot(model, optimizer):
    return (
        {n: p.detach().clone() for n, p in model.named_parameters()},
        [list(g["params"]) for g in optimizer.param_groups],
        dict(model._forward_hooks), dict(model._forward_pre_hooks), model.training,
    )


def assert_untouched(before, model, optimizer):
    params, groups, hooks, pre_hooks, training = before
    for n, p in model.named_parameters():
        assert torch.equal(p, params[n])
        assert p.grad is None
    assert [list(g["params"]) for g in optimizer.param_groups] == groups
    assert dict(model._forward_hooks) == hooks and dict(model._forward_pre_hooks) == pre_hooks
    assert model.training == training


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(), "exactly one of noise_multiplier and target_epsilon"),
        (dict(noise_multiplier=1.0, target_epsilon=1.0), "exactly one"),
        (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm"),
        (dict(noise_multiplier=1.0, max_grad_norm=-1.0), "max_grad_norm"),
        (dict(noise_multiplier=1.0, max_grad_norm=[1.0, 1.0]), "2 bounds for 4 trainable"),
        (dict(noise_multiplier=-0.5), "noise_multiplier"),
        (dict(target_epsilon=1.0), "epochs"),
        (dict(noise_multiplier=1.0, loss_reduction="max"), "loss_reduction"),
        (dict(noise_multiplier=1.0, clipping="auto"), "clipping"),
        (dict(noise_multiplier=1.0, accountant="moments"), "accountant"),
        (dict(noise_multiplier=1.0, target_delta=1.5), "target_delta"),
    ],
)
def test_bad_arguments(kwargs, match):
    model, optimizer, loader = setup()
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match=match):
        dpcompile.dp_compile(model, optimizer, loader, backend="eager", **kwargs)
    assert_untouched(before, model, optimizer)


def test_optimizer_with_foreign_parameters():
    model, _, loader = setup()
    stranger = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([*model.parameters(), stranger], lr=0.1)
    before = snapshot(model, optimizer)
    with pytest.raises(ValueError, match="not a parameter of the model"):
        dpcompile.dp_compile(model, optimizer, loader, noise_multiplier=1.0, backend="eager")
    assert_untouched(before, model, optimizer)


def test_loader_without_length():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from ((torch.randn(4), 0) for _ in range(10))

    model, optimizer, _ = setup()
    with pytest.raises(ValueError, match="no length"):
        dpcompile.dp_compile(model, optimizer, DataLoader(Stream(), batch_size=2), noise_multiplier=1.0)


def test_unsupported_model_fails_in_dp_compile():
    model, optimizer, loader = setup(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)))
    before = snapshot(model, optimizer)
    with pytest.raises(SampleMixingError, match="BatchNorm1d"):
        dpcompile.dp_compile(model, optimizer, loader, noise_multiplier=1.0, backend="eager")
    assert_untouched(before, model, optimizer)


def test_not_a_module_or_optimizer():
    model, optimizer, loader = setup()
    with pytest.raises(TypeError, match="nn.Module"):
        dpcompile.dp_compile(lambda x: x, optimizer, loader, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="Optimizer"):
        dpcompile.dp_compile(model, object(), loader, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="DataLoader"):
        dpcompile.dp_compile(model, optimizer, [1, 2, 3], noise_multiplier=1.0)
