"""lower: run a rewritten graph, through TorchInductor or eagerly (for debugging)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.fx as fx

from passes.kernels import with_eager_row_sums, with_fused_cells
from passes.partition import SplitGraphs, accepting_any_strides

Backend = Literal["inductor", "eager"]


def lower(graph_module: fx.GraphModule, backend: Backend = "inductor", *,
          keep_output_strides: bool = True) -> Callable[..., Any]:
    """A callable running ``graph_module``: compiled by Inductor, or the graph itself.

    Under Inductor, recurrence scans also compile their per-step cells (one kernel per step) and
    embedding gradients on CPU run as an eager row sum (see passes/kernels.py).

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
        graph_module = with_eager_row_sums(with_fused_cells(graph_module))
        return torch.compile(graph_module, backend="inductor", fullgraph=True, dynamic=False, options=options)
    raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")


def lower_split(graphs: SplitGraphs, backend: Backend = "inductor") -> tuple[Callable[..., Any], Callable[..., Any], bool]:
    """The forward and the private backward of one split, lowered together.

    Inductor computes a convolution net's forward channels-last on CPU. When the backward
    accepts saved values of any strides, the forward hands them over in that layout instead of
    copying each back (and the backward's kernels run channels-last too). The flag says the
    forward's outputs may come back in such a layout: the caller restores model outputs.
    Without convolutions Inductor keeps the traced layouts, and both graphs stay as they are.
    """
    convolves = any(n.target is torch.ops.aten.convolution.default for n in graphs.forward.graph.nodes)
    any_strides = accepting_any_strides(graphs.backward) if backend == "inductor" and convolves else None
    relaid = any_strides is not None
    forward = lower(graphs.forward, backend, keep_output_strides=not relaid)
    return forward, lower(any_strides or graphs.backward, backend), relaid
