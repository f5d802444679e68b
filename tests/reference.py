"""The shared micro-batch reference: each sample alone through plain autograd, in float64."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

CLIP_EPSILON = 1e-6


def per_sample_grads(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    batch_dim: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """One dict of gradients per sample (zeros for parameters the sample does not reach)."""
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    batch = inputs[0].shape[batch_dim]
    grads = []
    for b in range(batch):
        xs = [x.narrow(batch_dim, b, 1) for x in inputs]
        ys = [y.narrow(0, b, 1) for y in targets]
        loss = loss_fn(model(*xs), *ys).sum()
        gs = torch.autograd.grad(loss, list(named.values()), allow_unused=True)
        grads.append({n: (g if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named.items(), gs)})
    return grads


def clipped_reference(
    model: nn.Module,
    loss_fn: Callable[..., torch.Tensor],
    inputs: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    max_grad_norm: float | dict[str, float],
    clipping: str = "flat",
    mask: torch.Tensor | None = None,
    batch_dim: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(per-sample norms, Σ_b c_b g_b) computed sample by sample."""
    grads = per_sample_grads(model, loss_fn, inputs, targets, batch_dim)
    names = list(grads[0])
    batch = len(grads)
    if mask is None:
        mask = torch.ones(batch, dtype=torch.float64)
    if clipping == "flat":
        norms = torch.stack([torch.sqrt(sum(g.pow(2).sum() for g in gs.values())) for gs in grads])
        factors = (max_grad_norm / (norms + CLIP_EPSILON)).clamp(max=1.0) * mask.to(norms.dtype)
        clipped = {n: sum(factors[b] * grads[b][n] for b in range(batch)) for n in names}
        return norms, clipped
    norms = torch.stack([torch.stack([gs[n].norm() for n in names]) for gs in grads])  # (B, P)
    limits = torch.tensor([max_grad_norm[n] for n in names], dtype=norms.dtype)
    factors = (limits / (norms + CLIP_EPSILON)).clamp(max=1.0) * mask.to(norms.dtype)[:, None]
    clipped = {n: sum(factors[b, k] * grads[b][n] for b in range(batch)) for k, n in enumerate(names)}
    return norms, clipped
