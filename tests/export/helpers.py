"""dp_compiled models for the export and explain tests (eager backend: no Inductor compiles)."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, TensorDataset

import dpcompile
from tests.dpcompile.models import dataset_for, model_for

D = torch.float64


def compiled(name: str, *, sigma: float = 1.3, dtype: torch.dtype = D, batch_size: int = 8,
             lr: float = 0.5, **options):
    """(private model, DP optimizer, (x, y)) for a test model, compiled with backend='eager'."""
    model = model_for(name).to(dtype)
    x, y = dataset_for(name)
    if x.is_floating_point():
        x = x.to(dtype)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    options.setdefault("max_grad_norm", 0.5)
    private, optimizer, _ = dpcompile.dp_compile(
        model, optimizer, loader, noise_multiplier=sigma, backend="eager", **options
    )
    return private, optimizer, (x, y)


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)
