"""Scenarios run on every rank of a test job (see harness.py); each returns picklable values."""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, TensorDataset

import dpcompile

NUM_SAMPLES = 48
FEATURES = 6
CLASSES = 3


def build_data(num_samples: int = NUM_SAMPLES, nan_at: int | None = None) -> TensorDataset:
    """(x, y, index): the index says which sample a row is, so tests can see the batches."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(num_samples, FEATURES, generator=g, dtype=torch.float64)
    if nan_at is not None:
        x[nan_at] = float("nan")
    y = torch.randint(0, CLASSES, (num_samples,), generator=g)
    return TensorDataset(x, y, torch.arange(num_samples))


def build_model(seed: int = 0, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, CLASSES)).double()


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def train(rank: int, world: int, *, steps: int = 3, noise_multiplier: float = 0.0,
          max_grad_norm: float = 0.7, per_rank_batch: int = 6, lr: float = 0.5,
          optimizer: str = "sgd", max_physical_batch_size: int | None = None,
          clipping: str = "flat", zero_loss: bool = False, hidden: int = 8,
          checkpoint: str | None = None, wrap: bool = True, torch_seed: int = 0) -> dict[str, Any]:
    """A DDP-wrapped MLP trained for ``steps`` logical steps; what each step did."""
    model = build_model(hidden=hidden)
    if wrap:
        model = DistributedDataParallel(model)
    params = model.parameters()
    opt = torch.optim.Adam(params, lr=0.05) if optimizer == "adam" else torch.optim.SGD(params, lr=lr)
    loader = DataLoader(build_data(), batch_size=per_rank_batch)
    torch.manual_seed(torch_seed + 100 * rank)  # ranks' global generators differ on purpose
    model, opt, loader = dpcompile.dp_compile(
        model, opt, loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        backend="eager", max_physical_batch_size=max_physical_batch_size, clipping=clipping,
        distributed=None if wrap else True,
    )
    history: dict[str, Any] = {"initial": _flat(model).numpy(), "indices": [], "params": [],
                               "bounds": [], "seed": loader.batch_sampler.seed}
    logical: list[int] = []
    taken = 0
    while taken < steps:
        for x, y, index in loader:
            logical += index.tolist()
            opt.zero_grad()
            out = model(x)
            loss = 0.0 * out.sum() if zero_loss else F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            if loader.signal.end_of_logical_batch:
                history["indices"].append(logical)
                history["params"].append(_flat(model).numpy())
                history["bounds"].append(float(model.privacy.max_grad_norm))  # type: ignore[arg-type]
                logical = []
                taken += 1
                if taken == steps:
                    break
    history["steps"] = model.privacy.steps
    history["epsilon"] = model.privacy.epsilon(1e-5)
    history["expected_batch_size"] = model.privacy.expected_batch_size
    if checkpoint is not None:
        dpcompile.save_checkpoint(checkpoint, model, opt, loader)
        history["wrote_checkpoint"] = os.path.exists(checkpoint)
    return history


def resume(rank: int, world: int, *, checkpoint: str) -> dict[str, Any]:
    """Load a checkpoint into a fresh job of this world size; ε, steps and the next batch."""
    model = DistributedDataParallel(build_model(seed=99))  # other initial values: the file decides
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(build_data(), batch_size=12 // world)
    model, opt, loader = dpcompile.dp_compile(model, opt, loader, noise_multiplier=1.0,
                                              max_grad_norm=0.7, backend="eager")
    dpcompile.load_checkpoint(checkpoint, model, opt, loader)
    _, _, index = next(iter(loader))
    return {"epsilon": model.privacy.epsilon(1e-5), "steps": model.privacy.steps,
            "params": _flat(model).numpy(), "next_indices": index.tolist()}


def bad_setups(rank: int, world: int) -> dict[str, str]:
    """Ranks that disagree: the error each rank raised, by case."""
    errors = {}
    cases = {
        "values": lambda: (build_model(seed=rank), 1.0),
        "shapes": lambda: (build_model(hidden=8 + rank), 1.0),
        "settings": lambda: (build_model(), 1.0 + rank),
    }
    for case, make in cases.items():
        model, sigma = make()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        loader = DataLoader(build_data(), batch_size=6)
        try:
            dpcompile.dp_compile(model, opt, loader, noise_multiplier=sigma, max_grad_norm=1.0,
                                 backend="eager", distributed=True)
            errors[case] = "no error"
        except dpcompile.DistributedSetupError as error:
            errors[case] = str(error)
    return errors


def failing_rank(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 holds a sample with a NaN input (every sample joins every step, q = 1)."""
    model = DistributedDataParallel(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(build_data(8, nan_at=3), batch_size=4)
    model, opt, loader = dpcompile.dp_compile(model, opt, loader, noise_multiplier=1.0,
                                              max_grad_norm=1.0, backend="eager")
    before = _flat(model)
    x, y, _ = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    try:
        opt.step()
        error = "no error"
    except Exception as caught:
        error = f"{type(caught).__name__}: {caught}"
    return {"error": error, "unchanged": bool(torch.equal(before, _flat(model))),
            "steps": model.privacy.steps}


def dead_rank(rank: int, world: int) -> str:
    """Rank 1 dies after dp_compile; rank 0's step must fail, not wait forever."""
    model = DistributedDataParallel(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(build_data(8), batch_size=4)
    model, opt, loader = dpcompile.dp_compile(model, opt, loader, noise_multiplier=1.0,
                                              max_grad_norm=1.0, backend="eager")
    if rank == 1:
        os._exit(3)
    x, y, _ = next(iter(loader))
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return "stepped"


def world_info(rank: int, world: int) -> tuple[int, int, bool]:
    return dist.get_rank(), dist.get_world_size(), dist.is_initialized()


def opacus_script(rank: int, world: int) -> dict[str, Any]:
    """An Opacus distributed script with one changed import: DPDDP, DistributedSampler, make_private."""
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
    from torch.utils.data.distributed import DistributedSampler

    from dpcompile import PrivacyEngine

    data = build_data()
    model = DPDDP(build_model(seed=rank))  # DPDDP broadcasts rank 0's parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = DataLoader(data, batch_size=6, sampler=DistributedSampler(data))
    engine = PrivacyEngine(accountant="rdp")
    model, opt, loader = engine.make_private(module=model, optimizer=opt, data_loader=loader,
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    for x, y, _ in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {"params": _flat(model).numpy(), "steps": model.privacy.steps,
            "sample_rate": model.privacy.sample_rate, "epsilon": engine.get_epsilon(1e-5)}


def fixed_batches(rank: int, world: int) -> dict[str, Any]:
    """poisson_sampling=False: a DistributedSampler partitions the data; a plain loader is refused."""
    from torch.utils.data.distributed import DistributedSampler

    data = build_data()
    model = DistributedDataParallel(build_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    try:
        dpcompile.dp_compile(model, opt, DataLoader(data, batch_size=6, shuffle=True),
                             noise_multiplier=1.0, poisson_sampling=False, backend="eager")
        refused = "no error"
    except ValueError as error:
        refused = str(error)
    loader = DataLoader(data, batch_size=6, sampler=DistributedSampler(data, drop_last=True))
    model, opt, loader = dpcompile.dp_compile(model, opt, loader, noise_multiplier=1.0,
                                              poisson_sampling=False, backend="eager")
    seen = []
    for x, y, index in loader:
        seen += index.tolist()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return {"refused": refused, "seen": seen, "steps": model.privacy.steps,
            "sample_rate": model.privacy.sample_rate, "params": _flat(model).numpy()}
