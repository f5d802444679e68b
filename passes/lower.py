"""lower: run a rewritten graph, through TorchInductor or eagerly (for debugging)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx as fx

Backend = Literal["inductor", "eager"]


def lower(graph_module: fx.GraphModule, backend: Backend = "inductor", *,
          keep_output_strides: bool = True) -> Callable[..., Any]:
    """A callable running ``graph_module``: compiled by Inductor, or the graph itself.

    ``keep_output_strides=False`` lets Inductor return outputs in the layout it computed them in
    (for a forward whose saved values go to a backward that accepts any strides).
    """
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        # Shapes are static: one compiled graph per physical batch shape, never re-specialized.
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            None if keep_output_strides else {"keep_output_stride": False}
        )
        return torch.compile(graph_module, backend="inductor", fullgraph=True, dynamic=False, options=options)
    raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
