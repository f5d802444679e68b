"""dpcompile: differentially private training (DP-SGD) as a compiler transformation.

    model, optimizer, loader = dpcompile.dp_compile(model, optimizer, loader, noise_multiplier=1.1)

See ``dp_compile`` and the Opacus-compatible ``PrivacyEngine``; ``export`` / ``save`` / ``load``
turn the private training step into a portable torch.export artifact, ``explain`` shows what the
compiler did to each parameter.
"""

from dpcompile.api import PoissonSamplingWarning, dp_compile
from dpcompile.artifact import ArtifactError, ExportedStep, export, load, private_step, save
from dpcompile.data import DPDataLoader, PoissonBatchSampler
from dpcompile.explanation import Explanation, explain
from dpcompile.module import PrivateModule
from dpcompile.opacus_compat import BatchMemoryManager, PrivacyEngine
from dpcompile.optimizer import DPOptimizer
from dpcompile.privacy import AdaptiveClipping, PrivacyState

__version__ = "0.1.0"

__all__ = [
    "AdaptiveClipping",
    "ArtifactError",
    "BatchMemoryManager",
    "DPDataLoader",
    "DPOptimizer",
    "Explanation",
    "ExportedStep",
    "PoissonBatchSampler",
    "PoissonSamplingWarning",
    "PrivacyEngine",
    "PrivacyState",
    "PrivateModule",
    "dp_compile",
    "explain",
    "export",
    "load",
    "private_step",
    "save",
]
