"""Errors raised by the compiler. Each names the module, the op and the fix."""

from __future__ import annotations


class DPCompileError(Exception):
    """Base class: a model or loss cannot be compiled for private training."""


class SampleMixingError(DPCompileError):
    """The model combines different samples before a parameter gradient.

    DP-SGD clips each sample's gradient separately; an op that mixes samples (batch statistics,
    a mean over the batch) makes one sample's gradient depend on the others, so clipping no longer
    bounds any one sample's influence.
    """


class UnsupportedOpError(DPCompileError):
    """An op the sample-dimension analysis has no rule for touches batch data."""


class BatchDimensionError(DPCompileError):
    """The batch dimension of an input or output cannot be found or tracked."""


class LossError(DPCompileError):
    """The loss is not a per-sample loss (one value per sample)."""


class OutputError(DPCompileError):
    """The model's outputs cannot be differentiated per sample (non-tensor, or not per sample)."""


def describe(module: str | None, op: object) -> str:
    """'module `encoder.norm`, op aten.native_batch_norm' — the location part of a message."""
    if not module:
        where = "the model"
    else:
        where = f"module {module}" if module.startswith("`") else module
    return f"{where}, op {op}"
