"""The privacy state of a training run: one object, shared by the model, optimizer and loader."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from dpcompile.accounting import Accountant, accountant_from_state_dict


@dataclass
class AdaptiveClipping:
    """Quantile-based adaptive clipping (Andrew et al. 2021, "Differentially Private Learning with
    Adaptive Clipping"): C ← C·exp(−η·(b̃ − γ)), b̃ the noisy fraction of unclipped samples."""

    target_unclipped_quantile: float = 0.5  # γ
    clipbound_learning_rate: float = 0.2  # η
    count_noise_std: float = 0.0  # σ_b, in samples (default: expected batch size / 20)
    min_clipbound: float = 1e-6
    max_clipbound: float = 1e6

    def gradient_noise_multiplier(self, noise_multiplier: float) -> float:
        """σ_Δ such that (σ_Δ⁻² + (2σ_b)⁻²)^(-1/2) = σ: the count query's share of the budget."""
        if noise_multiplier <= 0:
            return 0.0
        share = (2 * self.count_noise_std) ** -2
        remaining = noise_multiplier**-2 - share
        if remaining <= 0:
            raise ValueError(
                f"adaptive clipping: the unclipped-count noise (std {self.count_noise_std:g}) "
                f"needs more than the whole privacy budget of noise_multiplier={noise_multiplier:g}; "
                "raise count_noise_std above noise_multiplier / 2 or the noise multiplier"
            )
        return remaining**-0.5


@dataclass
class PrivacyState:
    """What DP-SGD adds and what it has spent.

    ``noise_multiplier`` is σ as the accountant sees it; the gradient noise has std
    ``gradient_noise_multiplier · C`` per coordinate (equal to σ·C except with adaptive
    clipping, where part of the budget pays for the clipping bound). The accountant holds the
    history of steps and answers ``epsilon(delta)``.
    """

    noise_multiplier: float
    max_grad_norm: float | list[float]
    sample_rate: float
    dataset_size: int
    accountant: Accountant
    clipping: str = "flat"
    target_delta: float | None = None
    loss_reduction: str = "mean"
    poisson_sampling: bool = True
    secure_mode: bool = False
    adaptive: AdaptiveClipping | None = None
    parameter_names: list[str] = field(default_factory=list)
    max_epsilon: float | None = None  # the budget at target_delta (dpcompile.budget)
    nonfinite: str = "error"  # a sample with a NaN/Inf gradient: "error" or "drop" it

    @property
    def expected_batch_size(self) -> float:
        """q·N: the update is divided by this, never by the realized batch size."""
        return self.sample_rate * self.dataset_size

    @property
    def steps(self) -> int:
        return int(self.accountant.steps)

    @property
    def gradient_noise_multiplier(self) -> float:
        if self.adaptive is not None:
            return self.adaptive.gradient_noise_multiplier(self.noise_multiplier)
        return self.noise_multiplier

    @property
    def clip_norm(self) -> float:
        """The bound on one sample's whole gradient: C, or ‖(C_1, …, C_P)‖ per layer."""
        if isinstance(self.max_grad_norm, list):
            return math.sqrt(sum(c * c for c in self.max_grad_norm))
        return float(self.max_grad_norm)

    @property
    def noise_std(self) -> float:
        """Standard deviation of the Gaussian noise added to each coordinate of the clipped sum."""
        return self.gradient_noise_multiplier * self.clip_norm

    def epsilon(self, delta: float | None = None) -> float:
        """ε spent so far at ``delta`` (default: the target δ given to dp_compile)."""
        delta = self.target_delta if delta is None else delta
        if delta is None:
            raise ValueError("epsilon() needs a delta: pass delta=..., or target_delta to dp_compile")
        return float(self.accountant.epsilon(delta))

    def remaining_steps(self) -> int | None:
        """Steps left before ε would exceed ``max_epsilon`` (None without a budget)."""
        from dpcompile.budget import remaining_steps

        return remaining_steps(self)

    @property
    def budget_exhausted(self) -> bool:
        """True when one more step would take ε above ``max_epsilon``."""
        from dpcompile.budget import budget_allows_step

        return not budget_allows_step(self)

    def state_dict(self) -> dict[str, Any]:
        adaptive = None
        if self.adaptive is not None:
            adaptive = dict(self.adaptive.__dict__)
        return {
            "noise_multiplier": self.noise_multiplier,
            "max_grad_norm": self.max_grad_norm,
            "sample_rate": self.sample_rate,
            "dataset_size": self.dataset_size,
            "clipping": self.clipping,
            "target_delta": self.target_delta,
            "loss_reduction": self.loss_reduction,
            "poisson_sampling": self.poisson_sampling,
            "secure_mode": self.secure_mode,
            "adaptive": adaptive,
            "parameter_names": list(self.parameter_names),
            "max_epsilon": self.max_epsilon,
            "nonfinite": self.nonfinite,
            "accountant": self.accountant.state_dict(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> PrivacyState:
        adaptive = state.get("adaptive")
        return cls(
            noise_multiplier=float(state["noise_multiplier"]),
            max_grad_norm=state["max_grad_norm"],
            sample_rate=float(state["sample_rate"]),
            dataset_size=int(state["dataset_size"]),
            accountant=accountant_from_state_dict(state["accountant"]),
            clipping=state["clipping"],
            target_delta=state.get("target_delta"),
            loss_reduction=state.get("loss_reduction", "mean"),
            poisson_sampling=bool(state.get("poisson_sampling", True)),
            secure_mode=bool(state.get("secure_mode", False)),
            adaptive=AdaptiveClipping(**adaptive) if adaptive else None,
            parameter_names=list(state.get("parameter_names", [])),
            max_epsilon=state.get("max_epsilon"),
            nonfinite=state.get("nonfinite", "error"),
        )

    def __repr__(self) -> str:
        eps = ""
        if self.target_delta is not None and self.steps:
            eps = f", epsilon={self.epsilon():.3g} at delta={self.target_delta:g}"
        budget = f", max_epsilon={self.max_epsilon:g}" if self.max_epsilon is not None else ""
        return (
            f"PrivacyState(noise_multiplier={self.noise_multiplier:g}, max_grad_norm="
            f"{self.max_grad_norm}, sample_rate={self.sample_rate:g}, steps={self.steps}, "
            f"accountant={self.accountant.name!r}{eps}{budget})"
        )
