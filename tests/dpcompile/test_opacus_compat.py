"""An Opacus-style training script runs unchanged through dpcompile.PrivacyEngine."""

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpcompile

SCRIPT = """
import torch, torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset
{import_line}

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10))
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
criterion = nn.CrossEntropyLoss()
data = TensorDataset(torch.randn(256, 1, 8, 8), torch.randint(0, 10, (256,)))
train_loader = DataLoader(data, batch_size=32)

privacy_engine = PrivacyEngine(accountant="rdp")
model, optimizer, train_loader = privacy_engine.make_private(
    module=model,
    optimizer=optimizer,
    data_loader=train_loader,
    noise_multiplier=1.1,
    max_grad_norm=1.0,
)
losses = []
for epoch in range(2):
    model.train()
    for data, target in train_loader:
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
model.eval()
with torch.no_grad():
    predictions = model(torch.randn(4, 1, 8, 8)).argmax(1)
epsilon = privacy_engine.get_epsilon(1e-5)
accountant_epsilon = privacy_engine.accountant.get_epsilon(delta=1e-5)
"""


def run(import_line):
    scope = {}
    exec(SCRIPT.format(import_line=import_line), scope)
    return scope


@pytest.mark.inductor
def test_opacus_script_runs_unchanged():
    ours = run("from dpcompile import PrivacyEngine")
    assert ours["epsilon"] == ours["accountant_epsilon"]
    assert len(ours["losses"]) == 16
    opacus = pytest.importorskip("opacus")
    assert opacus.__version__.startswith("1.6")
    theirs = run("from opacus import PrivacyEngine")
    # same σ, sample rate and step count, same accountant: the same ε
    assert ours["epsilon"] == pytest.approx(theirs["epsilon"], rel=1e-6)


def test_make_private_arguments_and_ghost_mode_four_tuple():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))), batch_size=8)
    criterion = nn.CrossEntropyLoss()
    engine = dpcompile.PrivacyEngine(accountant="prv")
    out = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, criterion=criterion, grad_sample_mode="ghost",
        batch_first=True, poisson_sampling=True, clipping="flat", backend="eager",
    )
    assert len(out) == 4
    private, optimizer, crit, dl = out
    assert crit is criterion
    for x, y in dl:
        optimizer.zero_grad()
        crit(private(x), y).backward()
        optimizer.step()
    assert engine.get_epsilon(1e-5) > 0
    assert engine.accountant is private.privacy.accountant


def test_make_private_with_epsilon():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(40, 4), torch.randint(0, 3, (40,))), batch_size=8)
    engine = dpcompile.PrivacyEngine(accountant="rdp")
    private, optimizer, dl = engine.make_private_with_epsilon(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        target_epsilon=3.0, target_delta=1e-5, epochs=3, max_grad_norm=1.0, backend="eager",
    )
    assert optimizer.noise_multiplier > 0
    for _ in range(3):
        for x, y in dl:
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(x), y).backward()
            optimizer.step()
    assert engine.get_epsilon(1e-5) <= 3.0


def test_batch_memory_manager():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 3, (64,))), batch_size=32)
    engine = dpcompile.PrivacyEngine()
    private, optimizer, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data_loader=loader,
        noise_multiplier=1.0, max_grad_norm=1.0, backend="eager",
    )
    physical = 0
    with dpcompile.BatchMemoryManager(data_loader=dl, max_physical_batch_size=5, optimizer=optimizer) as batches:
        for x, y in batches:
            assert len(x) <= 5
            physical += 1
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(x), y).backward()
            optimizer.step()
    assert private.privacy.steps == len(dl)
    assert physical > len(dl)


def test_opacus_batch_memory_manager_drives_our_optimizer():
    """A script that keeps `from opacus.utils.batch_memory_manager import BatchMemoryManager`."""
    opacus_bmm = pytest.importorskip("opacus.utils.batch_memory_manager")
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    data = TensorDataset(torch.randn(64, 4, dtype=torch.float64), torch.randint(0, 3, (64,)))
    engine = dpcompile.PrivacyEngine()
    private, optimizer, dl = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=32), noise_multiplier=1.0, max_grad_norm=1.0,
        backend="eager",
    )
    physical = 0
    with opacus_bmm.BatchMemoryManager(data_loader=dl, max_physical_batch_size=5, optimizer=optimizer) as batches:
        for x, y in batches:
            assert len(x) <= 5
            physical += 1
            optimizer.zero_grad()
            nn.functional.cross_entropy(private(x), y).backward()
            optimizer.step()
    assert private.privacy.steps == len(dl)
    assert physical > len(dl)
