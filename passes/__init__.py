"""The dpcompile compiler: capture, sample-dimension analysis, per-sample rules, clipping, lowering.

The entry most callers want is :class:`PerSampleGradients`; the passes are public too:
``capture`` → ``analyze`` → ``private_backward`` → ``lower``.
"""

from passes.api import PerSampleGradients, PerSampleResult
from passes.capture import Capture, capture
from passes.errors import (
    BatchDimensionError,
    DPCompileError,
    LossError,
    OutputError,
    SampleMixingError,
    UnsupportedOpError,
)
from passes.grad_forms import NormPlan
from passes.lower import lower
from passes.per_sample_rules import register_per_sample_rule
from passes.rewrite import PrivateGraph, private_backward
from passes.sample_dims import Analysis, SampleDim, analyze, register_sample_rule

__all__ = [
    "Analysis",
    "BatchDimensionError",
    "Capture",
    "DPCompileError",
    "LossError",
    "NormPlan",
    "OutputError",
    "PerSampleGradients",
    "PerSampleResult",
    "PrivateGraph",
    "SampleDim",
    "SampleMixingError",
    "UnsupportedOpError",
    "analyze",
    "capture",
    "lower",
    "private_backward",
    "register_per_sample_rule",
    "register_sample_rule",
]
