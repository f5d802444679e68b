"""lower: run a rewritten graph, through TorchInductor or eagerly (for debugging)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx as fx

Backend = Literal["inductor", "eager"]


def lower(graph_module: fx.GraphModule, backend: Backend = "inductor") -> Callable[..., Any]:
    """A callable running ``graph_module``: compiled by Inductor, or the graph itself."""
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        # Shapes are static: one compiled graph per physical batch shape, never re-specialized.
        return torch.compile(graph_module, backend="inductor", fullgraph=True, dynamic=False)
    raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
