"""dpcompile: differentially private training (DP-SGD) as a compiler transformation.

    model, optimizer, loader = dpcompile.dp_compile(model, optimizer, loader, noise_multiplier=1.1)

See ``dp_compile`` and the Opacus-compatible ``PrivacyEngine``; ``export`` / ``save`` / ``load``
turn the private training step into a portable torch.export artifact, ``explain`` shows what the
compiler did to each parameter; docs/safety.md covers validation, budgets, checkpoints and
secure mode; docs/distributed.md covers training across ranks with torch.distributed.
"""

from dpcompile.api import PoissonSamplingWarning, SampleRateWarning, dp_compile
from dpcompile.artifact import ArtifactError, ExportedStep, export, load, private_step, save
from dpcompile.budget import PrivacyBudgetExceeded, PrivacyBudgetWarning
from dpcompile.checkpoint import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
)
from dpcompile.data import DPDataLoader, PoissonBatchSampler
from dpcompile.distributed import (
    DistributedSetupError,
    DistributedStepRefused,
    ShardedPoissonBatchSampler,
)
from dpcompile.explanation import Explanation, explain
from dpcompile.module import PrivateModule
from dpcompile.opacus_compat import BatchMemoryManager, PrivacyEngine
from dpcompile.optimizer import DPOptimizer, NonFiniteGradientError
from dpcompile.privacy import AdaptiveClipping, PrivacyState
from dpcompile.validate import Change, ModelValidationError, Problem, fix, validate

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipping",
    "ArtifactError",
    "BatchMemoryManager",
    "Change",
    "CheckpointError",
    "CheckpointMismatchError",
    "DPDataLoader",
    "DPOptimizer",
    "DistributedSetupError",
    "DistributedStepRefused",
    "Explanation",
    "ExportedStep",
    "ModelValidationError",
    "NonFiniteGradientError",
    "PoissonBatchSampler",
    "PoissonSamplingWarning",
    "PrivacyBudgetExceeded",
    "PrivacyBudgetWarning",
    "PrivacyEngine",
    "PrivacyState",
    "PrivateModule",
    "Problem",
    "SampleRateWarning",
    "ShardedPoissonBatchSampler",
    "dp_compile",
    "explain",
    "export",
    "fix",
    "load",
    "load_checkpoint",
    "private_step",
    "read_checkpoint",
    "save",
    "save_checkpoint",
    "validate",
]
