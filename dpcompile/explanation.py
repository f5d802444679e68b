"""``dpcompile.explain``: what the compiler did to each parameter, and what it costs.

For every parameter: the per-sample rule of each use (the reducing op found in the backward:
``mm``, ``bmm``, ``convolution``, ``embedding``, ``embedding_bag``, ``sum``, or ``vmap:<op>`` when
no rule matched and the op was evaluated once per sample with ``torch.vmap``), how its per-sample
norm is computed (``NormPlan.strategy``: ghost norm, materialized per-sample gradients, embedding
rows, dense per-sample values, or a mix), the estimated flops and memory of that norm, how many
times the graph uses the parameter, and the other names it goes by (tied weights). The numbers
are read from the plans the compiler recorded while rewriting the graph, not recomputed.

A dp_compiled model is explained through its own engine: the graphs explained are the ones its
training steps run for that batch shape (compiled now if no step has compiled them yet). A plain
``nn.Module`` is compiled the same way, with flat clipping, at exactly the batch size given.
With ``loss_fn`` the explained graph is the exported step's (forward + per-sample loss).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from dpcompile.accounting import create_accountant
from dpcompile.engine import Engine
from dpcompile.module import PrivateModule
from dpcompile.privacy import PrivacyState
from passes.grad_forms import NormPlan


@dataclass
class ParameterExplanation:
    """One parameter's row of the table."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    trainable: bool
    uses: int  # reducing uses in the backward graph (a module called twice: 2)
    rules: list[str]  # the per-sample rule of each use
    strategy: str  # NormPlan.strategy; "frozen" or "unused" without a gradient
    fallback: bool  # some use went through the vmap fallback
    flops: int  # estimated flops of the chosen norm computation
    memory_bytes: int  # estimated extra memory of that computation
    ghost_flops: int | None  # for matmul/convolution uses: both options
    materialized_flops: int | None
    shared_with: list[str] = field(default_factory=list)  # other names of the same tensor
    notes: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class Explanation:
    """The rows, the compiled batch, and (on request) the rewritten graphs as code."""

    model: str
    batch_size: int  # rows given
    compiled_batch_size: int  # rows of the compiled graph (padded to a bucket for a PrivateModule)
    clipping: str
    graph: str  # "training" (the engine's graphs) or "exported step" (with the loss)
    rows: list[ParameterExplanation]
    code: str | None = None

    def __iter__(self) -> Iterator[ParameterExplanation]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, name: str) -> ParameterExplanation:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(name)

    def strategies(self) -> dict[str, str]:
        """{parameter: strategy} for the parameters with a gradient."""
        return {r.name: r.strategy for r in self.rows if r.strategy not in ("frozen", "unused")}

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for row in data["rows"]:
            row["shape"] = list(row["shape"])
        return data

    def __str__(self) -> str:
        return self.table()

    def table(self) -> str:
        header = ["parameter", "shape", "uses", "rule", "strategy", "est. flops", "est. memory",
                  "other option", "shared with"]
        lines = []
        for r in self.rows:
            alternative = ""
            if r.ghost_flops is not None and r.materialized_flops is not None and r.trainable:
                if "ghost" in r.strategy:
                    alternative = f"materialized {_count(r.materialized_flops)}"
                elif "materialized" in r.strategy:
                    alternative = f"ghost {_count(r.ghost_flops)}"
            strategy = r.strategy + (" (vmap fallback)" if r.fallback else "")
            lines.append([
                r.name, "x".join(str(s) for s in r.shape) or "scalar", str(r.uses),
                _rules(r.rules) or "-", strategy,
                _count(r.flops) if r.trainable and r.uses else "-",
                _bytes(r.memory_bytes) if r.trainable and r.uses else "-",
                alternative, ", ".join(r.shared_with),
            ])
        widths = [max(len(h), *(len(line[k]) for line in lines)) if lines else len(h) for k, h in enumerate(header)]

        def fmt(cells: list[str]) -> str:
            return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

        padded = ""
        if self.compiled_batch_size != self.batch_size:
            padded = f", compiled at {self.compiled_batch_size} rows (padding bucket)"
        out = [
            f"{self.model}: {self.graph} graph, batch of {self.batch_size}{padded}, "
            f"{self.clipping} clipping",
            fmt(header),
            fmt(["-" * w for w in widths]),
            *(fmt(line) for line in lines),
        ]
        with_grads = [r for r in self.rows if r.strategy not in ("frozen", "unused")]
        counts: dict[str, int] = {}
        for r in with_grads:
            for part in r.strategy.split("+"):
                counts[part] = counts.get(part, 0) + 1
        fallbacks = sum(r.fallback for r in with_grads)
        summary = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
        total_flops = sum(r.flops for r in with_grads)
        total_memory = sum(r.memory_bytes for r in with_grads)
        out.append("")
        out.append(
            f"{len(with_grads)} parameter{'s' if len(with_grads) != 1 else ''} with gradients: "
            f"{summary or 'none'}; {fallbacks} via "
            f"the vmap fallback. Per-sample norms: about {_count(total_flops)} flops and "
            f"{_bytes(total_memory)} of extra memory per step."
        )
        if self.code is None:
            out.append("Rewritten graphs: explain(..., code=True) or `dpcompile explain ... --code`.")
        return "\n".join(out)


def _rules(rules: list[str]) -> str:
    counts: dict[str, int] = {}
    for rule in rules:
        root, found, ops = rule.partition("vmap:")
        if found:
            short = ", ".join(_op_name(op) for op in ops.split(","))
            label = f"{root.replace('>', ' -> ')}vmap ({short})"
        else:
            label = rule or "?"
        counts[label] = counts.get(label, 0) + 1
    return ", ".join(f"{k}x{n}" if n > 1 else k for k, n in counts.items())


def _op_name(op: str) -> str:
    """'aten.permute.default' -> 'permute'; other namespaces keep theirs."""
    parts = op.split(".")
    if len(parts) == 3 and parts[0] == "aten":
        return parts[1]
    return op


def _count(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


# ---- building it ------------------------------------------------------------------------------


def _aliases(module: nn.Module) -> dict[str, list[str]]:
    """Canonical parameter name (as named_parameters() lists it) -> its other names."""
    by_id: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names[1:] for names in by_id.values()}


def _rows(module: nn.Module, plans: dict[str, NormPlan]) -> list[ParameterExplanation]:
    aliases = _aliases(module)
    rows = []
    for name, p in module.named_parameters():
        plan = plans.get(name)
        size = p.element_size()
        if plan is None:
            strategy = "unused" if p.requires_grad else "frozen"
            notes = ["no gradient reaches it: its update is noise only"] if p.requires_grad else []
            rows.append(ParameterExplanation(
                name, tuple(p.shape), str(p.dtype).removeprefix("torch."), p.requires_grad, 0, [],
                strategy, False, 0, 0, None, None, aliases.get(name, []), notes,
            ))
            continue
        has_outer = plan.ghost_flops > 0 or plan.materialized_flops > 0
        rows.append(ParameterExplanation(
            name=name,
            shape=tuple(p.shape),
            dtype=str(p.dtype).removeprefix("torch."),
            trainable=True,
            uses=plan.uses,
            rules=list(plan.rules),
            strategy=plan.strategy,
            fallback=plan.fallback,
            flops=plan.flops,
            memory_bytes=plan.memory_elements * size,
            ghost_flops=plan.ghost_flops if has_outer else None,
            materialized_flops=plan.materialized_flops if has_outer else None,
            shared_with=aliases.get(name, []),
            notes=list(plan.notes),
        ))
    return rows


def _as_inputs(example: Any) -> tuple[torch.Tensor, ...]:
    values = tuple(example) if isinstance(example, (tuple, list)) else (example,)
    for k, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(
                f"example input {k} is a {type(v).__name__}: explain takes the model's input "
                "tensors (a tensor or a tuple of them), or (inputs, targets) with loss_fn"
            )
    return values


def _readable(gm: torch.fx.GraphModule, title: str) -> str:
    return f"# ---- {title}\n" + gm.print_readable(print_output=False)


def explain(model: nn.Module, example_inputs: Any, *, code: bool = False,
            loss_fn: Any = None) -> Explanation:
    """Explain how the compiler makes ``model``'s gradients private, parameter by parameter.

    ``example_inputs``: the model's input tensor(s) for one batch (``model(*inputs)``); with
    ``loss_fn``, the ``(inputs, targets)`` batch of :func:`dpcompile.export` instead, and the
    graph explained is the exported step's. ``code=True`` adds the rewritten graphs as readable
    code (``Explanation.code``). ``str(explanation)`` is a table.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    private = model if isinstance(model, PrivateModule) else None
    module = private.module if private is not None else model
    name = type(module).__name__
    if loss_fn is not None:
        from dpcompile.artifact import loss_private_graph, per_sample_loss, split_batch

        inputs, targets = split_batch(example_inputs)
        engine = private._engine if private is not None else None
        clipping = "flat"
        if engine is not None and engine.state.clipping == "per_layer":
            clipping = "per_layer"
        graph = loss_private_graph(module, inputs, per_sample_loss(loss_fn), targets,
                                   batch_dim=engine.batch_dim if engine else 0, clipping=clipping)
        batch = graph.capture.batch_size
        return Explanation(
            model=name, batch_size=batch, compiled_batch_size=batch,
            clipping=engine.state.clipping if engine else "flat", graph="exported step",
            rows=_rows(module, graph.plans),
            code=_readable(graph.graph_module, "private step: (params, frozen, buffers, batch, "
                           "seeds, mask, max_grad_norm) -> (losses, per-sample norms, clipped sums)")
            if code else None,
        )

    inputs = _as_inputs(example_inputs)
    if private is not None:
        engine = private._engine
    else:
        count = len(inputs[0]) if inputs and inputs[0].dim() else 0
        state = PrivacyState(noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0,
                             dataset_size=max(count, 1), accountant=create_accountant("rdp"))
        engine = Engine(module, state, backend="eager", max_physical_batch_size=max(count, 2))
    # the graphs a step with gradients runs, traced in the module's current train/eval mode
    tensors, spec, constants = engine._flatten_call(inputs, {})
    count = engine.batch_size(tensors)
    padded = engine.padded_size(count)
    step = engine.compiled_step(tensors, spec, constants, padded)
    text = None
    if code:
        text = "\n".join([
            _readable(step.graphs.forward, "forward: (params, frozen, buffers, batch) -> (outputs, saved)"),
            _readable(step.graphs.backward, "private backward: (saved, output grads, mask, "
                      "max_grad_norm) -> (per-sample norms, clipped sums)"),
        ])
    return Explanation(
        model=name, batch_size=count, compiled_batch_size=padded, clipping=engine.state.clipping,
        graph="training", rows=_rows(module, step.plans), code=text,
    )
