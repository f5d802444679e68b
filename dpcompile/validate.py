"""Model validation and repair: every reason a model cannot be trained privately, with a fix.

``validate(model)`` reports; it never raises for a problem it finds. It checks

- the module tree (no input needed): BatchNorm of any kind (batch statistics mix samples, and
  its running statistics are updated from the batch), InstanceNorm with
  ``track_running_stats=True`` (running statistics updated from the batch), parameters of lazy
  modules that are not initialized yet;
- with ``example_inputs``, the compiler's verdict on a sandbox copy of the model: the capture
  and the sample-dimension analysis (sample-mixing ops, unsupported ops), and buffers that the
  forward overwrites with values computed from the batch. Such a buffer is part of the released
  model but never clipped or noised: it leaks the training data around DP-SGD. Buffers updated
  independently of the data (a step counter) are fine.

``fix(model)`` returns a repaired copy and the list of changes: BatchNorm becomes GroupNorm with
``gcd(C, 32)`` groups (32 groups as in Wu & He 2018 when the channel count allows it, fewer
otherwise; the affine parameters are copied), InstanceNorm stops tracking running statistics.

``dp_compile`` runs the module-tree checks first and raises :class:`ModelValidationError`
listing every problem; the compiler's checks run when it compiles the first batch.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter

from passes.errors import DPCompileError, SampleMixingError

__all__ = ["Change", "ModelValidationError", "Problem", "buffer_update_problems", "fix", "validate"]

BATCHNORM_FIX = (
    "replace it with GroupNorm (dpcompile.fix(model) does this) or LayerNorm; keeping it in eval "
    "mode does not help under dp_compile, because model.train() switches it back"
)
RUNNING_STATS_FIX = (
    "construct it with track_running_stats=False (dpcompile.fix(model) does this): per-sample "
    "normalization needs no running statistics"
)
BUFFER_FIX = (
    "do not update buffers from the batch during training (compute the statistic privately, or "
    "update it only in eval mode); buffers are released with the model but never clipped or "
    "noised"
)
LAZY_FIX = "run one forward pass on a batch to initialize it before dp_compile"


class ModelValidationError(SampleMixingError):
    """dp_compile found problems that make private training invalid; ``problems`` lists them.

    A :class:`~passes.errors.SampleMixingError` (and so a ``DPCompileError``) because, like the
    compiler's own error, it means one sample's data would reach the model outside the per-sample
    clipping.
    """

    def __init__(self, problems: Sequence[Problem]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(
            f"the model cannot be trained privately ({count} problem{'s' if count > 1 else ''}):\n"
            f"{lines}"
        )


@dataclass(frozen=True)
class Problem:
    """One reason a model cannot be trained privately."""

    module: str  # qualified module name; "" is the model itself
    kind: str  # batchnorm | running_stats | buffer_update | sample_mixing | compile | uninitialized
    message: str
    fix: str

    def __str__(self) -> str:
        where = f"`{self.module}`" if self.module else "the model"
        return f"{where}: {self.message}. Fix: {self.fix}"


@dataclass(frozen=True)
class Change:
    """One change made by :func:`fix`."""

    module: str
    before: str
    after: str

    def __str__(self) -> str:
        return f"`{self.module or '<model>'}`: {self.before} -> {self.after}"


# ---- validate ---------------------------------------------------------------------------


def validate(model: nn.Module, example_inputs: Any = None, *, batch_dim: int = 0) -> list[Problem]:
    """Every reason ``model`` cannot be trained with DP-SGD, each with a fix (empty: none found).

    Without ``example_inputs`` only the module tree is checked. With them (a tensor or a tuple of
    tensors: one batch of at least 2 samples, as the model is called), a copy of the model is
    also compiled the way dp_compile compiles it, in training mode: the compiler reports
    sample-mixing ops (one problem: it stops at the first; BatchNorm modules already reported
    are frozen in the copy so that it looks past them) and the analysis of the captured graph
    reports buffers overwritten with values computed from the batch. The model itself is not
    modified.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"validate needs a torch.nn.Module, got {type(model).__name__}")
    problems = structural_problems(model)
    if example_inputs is None:
        return problems
    if any(p.kind == "uninitialized" for p in problems):
        return problems
    problems += _compiler_problems(model, example_inputs, batch_dim)
    return problems


def structural_problems(model: nn.Module) -> list[Problem]:
    """The checks that need no input: normalization layers and uninitialized parameters."""
    problems: list[Problem] = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, _BatchNorm):
            if module.training:
                message = (f"{kind} normalizes with statistics of the whole batch, so every sample's "
                           "gradient depends on the other samples and clipping no longer bounds one "
                           "sample's influence")
                if module.track_running_stats:
                    message += "; its running statistics are also updated from the batch, unnoised"
            else:
                message = (f"{kind} is in eval mode, but model.train() (which training loops and "
                           "dp_compile call) switches it back to batch statistics, which mix samples")
            problems.append(Problem(name, "batchnorm", message, BATCHNORM_FIX))
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(Problem(
                name, "running_stats",
                f"{kind} has track_running_stats=True: in training its running statistics are "
                "averaged over the batch and stored in the model without clipping or noise",
                RUNNING_STATS_FIX,
            ))
        lazy = [n for n, p in module.named_parameters(recurse=False)
                if isinstance(p, UninitializedParameter)]
        lazy += [n for n, b in module.named_buffers(recurse=False) if isinstance(b, UninitializedBuffer)]
        if lazy:
            problems.append(Problem(
                name, "uninitialized",
                f"{kind} is a lazy module whose {', '.join(f'`{n}`' for n in lazy)} "
                f"{'is' if len(lazy) == 1 else 'are'} not initialized", LAZY_FIX,
            ))
    return problems


def _compiler_problems(model: nn.Module, example_inputs: Any, batch_dim: int) -> list[Problem]:
    from passes import analyze, capture, private_backward

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
        raise TypeError("example_inputs must be a tensor or a tuple of tensors (one batch)")
    sandbox = copy.deepcopy(model)
    sandbox.train()
    for module in sandbox.modules():
        if isinstance(module, _BatchNorm):
            module.eval()  # already reported; let the compiler look past it
    problems: list[Problem] = []
    try:
        cap = capture(sandbox, [t.detach() for t in inputs], batch_dim=batch_dim)
        problems += buffer_update_problems(cap, sandbox)
        analysis = analyze(cap)
        private_backward(cap, analysis)
    except SampleMixingError as error:
        problems.append(Problem(_module_in(str(error)), "sample_mixing", *_split_fix(str(error))))
    except DPCompileError as error:
        problems.append(Problem(_module_in(str(error)), "compile", str(error),
                                "see the message; the model must be changed to compile"))
    return problems


def buffer_update_problems(cap: Any, model: nn.Module) -> list[Problem]:
    """Buffers that the captured forward overwrites with values computed from the batch."""
    graph: fx.Graph = cap.graph_module.graph
    placeholders = cap.placeholders()
    start = cap.num_params
    buffer_nodes = dict(zip(placeholders[start : start + len(cap.buffers)], cap.buffers))
    batch_nodes = set(cap.batch_placeholders())
    depends: dict[fx.Node, bool] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            depends[node] = node in batch_nodes
        else:
            depends[node] = any(depends.get(a, False) for a in node.all_input_nodes)
    problems = []
    seen = set()
    for node in graph.nodes:
        if node.op != "call_function" or "copy" not in str(node.target) or not node.args:
            continue
        target = node.args[0]
        if target not in buffer_nodes or target in seen:
            continue
        if any(depends.get(a, False) for a in node.all_input_nodes):
            seen.add(target)
            full = buffer_nodes[target]
            owner, _, short = full.rpartition(".")
            kind = type(model.get_submodule(owner)).__name__ if owner else type(model).__name__
            problems.append(Problem(
                owner, "buffer_update",
                f"the forward of {kind} overwrites buffer `{short}` with a value computed from "
                "the batch", BUFFER_FIX,
            ))
    return problems


def _module_in(message: str) -> str:
    match = re.search(r"`([^`]*)`", message)
    return match.group(1) if match else ""


def _split_fix(message: str) -> tuple[str, str]:
    """The compiler's messages end with the fix after the first '. '; split them."""
    head, sep, tail = message.partition(". ")
    if not sep:
        return message, "compute this per sample (reduce over non-batch dimensions only)"
    return head, tail.rstrip(".")


# ---- fix ----------------------------------------------------------------------------------


def group_count(channels: int) -> int:
    """GroupNorm groups for ``channels``: gcd(channels, 32) (32 when divisible, as in Wu & He)."""
    return math.gcd(int(channels), 32)


def fix(model: nn.Module) -> tuple[nn.Module, list[Change]]:
    """A copy of ``model`` with BatchNorm replaced by GroupNorm and InstanceNorm running
    statistics turned off; returns ``(copy, changes)``. The model passed in is not modified.

    GroupNorm gets ``gcd(C, 32)`` groups, BatchNorm's ``eps`` and, when affine, its weight and
    bias (a normalization over other statistics, so the trained values are a starting point,
    not an equivalent model). Lazy BatchNorm must be initialized first (run one forward).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fix needs a torch.nn.Module, got {type(model).__name__}")
    fixed = copy.deepcopy(model)
    changes: list[Change] = []
    replacement = _replacement(fixed, "", changes)
    if replacement is not None:
        return replacement, changes
    done: dict[int, nn.Module] = {}  # a module used in two places gets one replacement
    for name, module in list(fixed.named_modules()):
        for child_name, child in list(module._modules.items()):  # shared children too
            if child is None:
                continue
            full = f"{name}.{child_name}" if name else child_name
            new = done.get(id(child)) or _replacement(child, full, changes)
            if new is not None:
                done[id(child)] = new
                setattr(module, child_name, new)
    return fixed, changes


def _replacement(module: nn.Module, name: str, changes: list[Change]) -> nn.Module | None:
    if isinstance(module, _BatchNorm):
        if isinstance(module.weight, UninitializedParameter) or isinstance(
            getattr(module, "running_mean", None), UninitializedBuffer
        ):
            raise ValueError(
                f"`{name or '<model>'}` ({type(module).__name__}) is a lazy module that is not "
                "initialized yet: run one forward pass before dpcompile.fix"
            )
        channels = module.num_features
        groups = group_count(channels)
        ref = module.weight if module.weight is not None else module.running_mean
        factory: dict[str, Any] = {}
        if ref is not None:
            factory = {"device": ref.device, "dtype": ref.dtype}
        new = nn.GroupNorm(groups, channels, eps=module.eps, affine=module.affine, **factory)
        if module.affine:
            with torch.no_grad():
                new.weight.copy_(module.weight)
                new.bias.copy_(module.bias)
        new.train(module.training)
        changes.append(Change(name, f"{type(module).__name__}({channels})",
                              f"GroupNorm({groups}, {channels})"))
        return new
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        momentum = module.momentum if module.momentum is not None else 0.1  # unused without stats
        new_norm = type(module)(module.num_features, eps=module.eps, momentum=momentum,
                                affine=module.affine, track_running_stats=False)
        if module.affine:
            new_norm = new_norm.to(device=module.weight.device, dtype=module.weight.dtype)
            with torch.no_grad():
                new_norm.weight.copy_(module.weight)
                new_norm.bias.copy_(module.bias)
        new_norm.train(module.training)
        kind = type(module).__name__
        changes.append(Change(name, f"{kind}({module.num_features}, track_running_stats=True)",
                              f"{kind}({module.num_features}, track_running_stats=False)"))
        return new_norm
    return None
