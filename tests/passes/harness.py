"""Compare the compiler's per-sample norms and clipped sums with the micro-batch reference."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from passes import PerSampleGradients
from passes.rewrite import example_private_inputs
from tests.reference import clipped_reference


def sum_loss(out: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
    """A per-sample loss touching every output element: Σ over non-batch dims of out·w."""
    weights = torch.linspace(-1.0, 1.5, out[0].numel(), dtype=out.dtype).reshape(out.shape[1:])
    return (out * weights).flatten(1).sum(1) + 0.1 * out.pow(2).flatten(1).sum(1)


def cross_entropy(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out, y, reduction="none")


def assert_matches_reference(
    model: nn.Module,
    inputs: Sequence[torch.Tensor] | torch.Tensor,
    targets: Sequence[torch.Tensor] | torch.Tensor = (),
    loss_fn: Callable[..., torch.Tensor] = sum_loss,
    *,
    max_grad_norm: float | None = None,
    clipping: str = "flat",
    mask: torch.Tensor | None = None,
    backend: str = "eager",
    batch_dim: int = 0,
    low_memory: bool = False,
    rtol: float = 1e-6,
    atol: float = 1e-9,
) -> PerSampleGradients:
    """Check norms and clipped sums; clip about half the samples unless C is given."""
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    targets = tuple(targets) if isinstance(targets, (tuple, list)) else (targets,)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if max_grad_norm is None:
        norms, _ = clipped_reference(model, loss_fn, inputs, targets, 1.0, "flat", batch_dim=batch_dim)
        max_grad_norm = float(norms.median()) if norms.numel() else 1.0
        max_grad_norm = max(max_grad_norm, 1e-3)
    limit: float | dict[str, float] = max_grad_norm
    if clipping == "per_layer":
        limit = {n: max_grad_norm * (0.5 + 0.1 * (k % 5)) for k, n in enumerate(names)}
    ref_norms, ref_clipped = clipped_reference(
        model, loss_fn, inputs, targets, limit, clipping, mask=mask, batch_dim=batch_dim
    )
    compiled = PerSampleGradients(model, loss_fn, clipping=clipping, backend=backend, batch_dim=batch_dim,
                                  low_memory=low_memory)
    result = compiled(inputs, targets, max_grad_norm=limit if clipping == "flat" else [limit[n] for n in names], mask=mask)
    got_norms = result.per_sample_norms
    if clipping == "per_layer":
        # the reference lists every trainable parameter; the compiler those with gradients
        order = [names.index(n) for n in result.clipped_grads]
        ref_norms = ref_norms[:, order]
    torch.testing.assert_close(got_norms, ref_norms.to(got_norms.dtype), rtol=rtol, atol=atol)
    for name in names:
        expected = ref_clipped[name]
        got = result.clipped_grads.get(name)
        if got is None:
            assert expected.abs().max() == 0, f"{name}: no gradient returned but the reference has one"
            continue
        torch.testing.assert_close(got, expected.to(got.dtype), rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}")
    return compiled


def forward_and_backward_inputs(cap) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A capture's example private inputs, split into the forward graph's and the backward
    graph's (seeds, mask, clipping bound: what follows the saved values)."""
    inputs = example_private_inputs(cap)
    num_forward = cap.num_params + len(cap.buffers) + cap.num_batch
    return inputs[:num_forward], inputs[num_forward:]


def saved_and_backward_inputs(cap, graphs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Run a split's forward graph on the capture's example inputs: (saved values, backward's other inputs)."""
    forward_inputs, rest = forward_and_backward_inputs(cap)
    results = graphs.forward(*forward_inputs)
    return list(results[graphs.num_outputs :]), rest
