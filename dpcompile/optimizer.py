"""The optimizer of a dp_compiled model: noise once per logical batch, then the user's update.

``step()`` on a physical batch that does not end its logical batch only keeps accumulating. On
the last one it sets every trainable parameter's ``.grad`` to

    (Σ_b c_b·g_b + N(0, σ_Δ²·C²)) / (q·N)      (loss_reduction="mean"; no division for "sum")

with the clipped sums from the compiled backward, tells the accountant, updates an adaptive
clipping bound, and runs the wrapped optimizer.

Before it releases anything, the last physical step checks (``check_before_release``): buffers
updated from the batch in a newly compiled graph, non-finite per-sample gradients (policy
``nonfinite``: "error" raises :class:`NonFiniteGradientError`, "drop" lets such samples contribute
nothing) and the privacy budget (:class:`~dpcompile.budget.PrivacyBudgetExceeded`). A refused step
discards the logical batch: its clipped sums and the ``.grad`` that autograd wrote (unnoised
clipped sums, never to be used) are cleared, and neither the parameters, the wrapped optimizer's
state nor the accountant change.

Noise comes from :class:`~dpcompile.noise.NoiseSource` in one pass that adds it and divides by the
expected batch size. On CUDA that is ``torch.randn`` and two multi-tensor ``_foreach`` kernels. On
the CPU, large float32 noise of a compiled model is one Inductor kernel: the counter-based Philox
generator, Box-Muller, the addition and the division, vectorized over both cores (670k parameters:
2.0 against 2.5 ms with a separate draw, add and division from the same generator, and 3.8-6.1 ms
with torch's Mersenne Twister sampler, on a 2-core Intel VM). Inductor's own ``randn`` lowering was
about 6x slower than eager ``torch.randn`` there, so the sampler is written in tensor ops rather
than compiled from ``torch.randn``. The wrapped optimizer's update stays eager: compiling it
measured 0.3 ms (SGD with momentum) and 0.5 ms (Adam) faster on the 670k-parameter MLP, for ~10 s
of extra compile time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.optim import Optimizer

from dpcompile.budget import (
    PrivacyBudgetExceeded,
    budget_allows_step,
    budget_message,
    epsilon_after,
)
from dpcompile.data import StepSignal
from dpcompile.distributed import DistributedJob, DistributedStepRefused
from dpcompile.engine import Engine
from dpcompile.noise import NoiseSource
from dpcompile.validate import ModelValidationError, buffer_update_problems


class NonFiniteGradientError(FloatingPointError):
    """A sample's gradient was NaN or infinite (policy ``nonfinite="error"``); nothing was updated."""


class DPOptimizer(Optimizer):
    """Wraps a torch optimizer; shares its parameter groups and state."""

    def __init__(self, optimizer: Optimizer, engine: Engine, signal: StepSignal, noise: NoiseSource,
                 job: DistributedJob | None = None) -> None:
        # Deliberately not calling Optimizer.__init__: the wrapped optimizer owns the state.
        self.original_optimizer = optimizer
        self.engine = engine
        self.signal = signal
        self.noise = noise
        self.job = job  # the distributed job, or None for one process
        self._step_hooks: dict[int, Callable[..., Any]] = {}
        self._checked_graphs: set[int] = set()  # compiled steps whose buffer updates were checked
        self.dropped_samples = 0  # samples dropped for a non-finite gradient (nonfinite="drop")
        self._dropped_now = 0

    # ---- the wrapped optimizer's face --------------------------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.original_optimizer.param_groups = value

    @property
    def state(self) -> Any:  # type: ignore[override]
        return self.original_optimizer.state

    @state.setter
    def state(self, value: Any) -> None:
        self.original_optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.original_optimizer.defaults = value

    @property
    def privacy(self) -> Any:
        return self.engine.state

    @property
    def noise_multiplier(self) -> float:
        return self.engine.state.noise_multiplier

    @property
    def max_grad_norm(self) -> float | list[float]:
        return self.engine.state.max_grad_norm

    @property
    def expected_batch_size(self) -> float:
        return self.engine.state.expected_batch_size

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RuntimeError(
            "parameters cannot be added to a dp_compiled optimizer: the privacy analysis covers "
            "the model it was compiled with; add them before calling dp_compile"
        )

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none)

    def signal_skip_step(self, do_skip: bool = True) -> None:
        """Opacus's hook for physical batches: the next ``step()`` only accumulates when true
        (what ``opacus.utils.batch_memory_manager.BatchMemoryManager`` calls)."""
        self.signal.end_of_logical_batch = not do_skip

    def __repr__(self) -> str:
        return f"DPOptimizer({self.original_optimizer!r}, privacy={self.engine.state!r})"

    # ---- the private step --------------------------------------------------------------
    def clipped_sums(self) -> list[torch.Tensor]:
        """Σ_b c_b·g_b of the logical batch for every trainable parameter (zeros if unused)."""
        sums = []
        for name, p in self.engine.trainable():
            acc = self.engine.accumulator.get(name)
            sums.append(acc if acc is not None else torch.zeros_like(p))
        return sums

    def add_noise(self, grads: list[torch.Tensor]) -> None:
        """Add N(0, σ_Δ²C²) to every coordinate, in place."""
        self.noise.add_noise_(grads, self.engine.state.noise_std)

    def pre_step(self) -> bool:
        """Noise and scale the accumulated clipped sums into ``.grad``; False on a virtual step."""
        if not self.signal.end_of_logical_batch:
            return False
        state = self.engine.state
        denominator = state.expected_batch_size if state.loss_reduction == "mean" else 1.0
        if self.job is not None:
            grads, unclipped = self._job_sums()
            if denominator != 1:
                torch._foreach_div_(grads, denominator)
        else:
            grads = self._checked_local_sums()
            self.noise.add_noise_(grads, state.noise_std, denominator)  # one pass (compiled on CPU)
            unclipped = self._noisy_unclipped_count()
        for (_, p), g in zip(self.engine.trainable(), grads):
            p.grad = g.to(p.dtype)
        self._update_clip_bound(unclipped)
        state.accountant.step(state.noise_multiplier, state.sample_rate)
        self.engine.reset()
        return True

    def _job_sums(self) -> tuple[list[torch.Tensor], float]:
        """The whole job's clipped sums plus noise drawn once (by rank 0), on every rank, and the
        job's noisy unclipped count; every rank refuses the step if any rank does."""
        job = self.job
        assert job is not None
        refusal: BaseException | None = None
        grads: list[torch.Tensor] = []
        try:
            grads = self._checked_local_sums()
        except Exception as error:
            refusal = error
        # The count's noise, like the gradient noise, is drawn once for the job (by rank 0).
        count = self._noisy_unclipped_count() if job.rank == 0 else self.engine.unclipped_count
        refused, unclipped = job.agree(refusal is not None, count)
        if refusal is not None:
            raise refusal  # this rank's own reason; the others raise DistributedStepRefused
        if refused:
            self.discard_batch()
            raise DistributedStepRefused(
                f"rank(s) {', '.join(map(str, refused))} refused this logical step (see their "
                "errors: a non-finite gradient, the privacy budget, or a buffer check); no rank "
                "updated its parameters or its accountant"
            )
        grads = job.sum_across_ranks(grads, self.add_noise if job.rank == 0 else None)
        return grads, unclipped

    def _checked_local_sums(self) -> list[torch.Tensor]:
        """This process's clipped sums, after the checks that may refuse the step."""
        self.check_before_release()
        grads = self.clipped_sums()
        if self.engine.state.nonfinite == "drop" and self._dropped_now:
            self._check_finite_sums(grads)
        return grads

    # ---- checks before anything is released -----------------------------------------------
    def discard_batch(self) -> None:
        """Forget the current logical batch: its clipped sums and the ``.grad`` autograd wrote."""
        self.engine.reset()
        for _, p in self.engine.trainable():
            p.grad = None

    def check_before_release(self) -> None:
        """Raise (after discarding the logical batch) if this step must not be taken."""
        self._dropped_now = 0
        try:
            self._check_buffers()
            self._check_nonfinite()
            self._check_budget()
        except BaseException:
            self.discard_batch()
            raise

    def _check_buffers(self) -> None:
        problems = []
        for step in list(self.engine._steps.values()):
            if id(step) in self._checked_graphs:
                continue
            problems += buffer_update_problems(step.capture, self.engine.module)
            self._checked_graphs.add(id(step))
        if problems:
            raise ModelValidationError(problems)

    def _check_nonfinite(self) -> None:
        log = [n for n in self.engine.norm_log if n.numel()]
        if not log:
            return
        norms = torch.cat([n.reshape(n.shape[0], -1) for n in log])
        bad = ~torch.isfinite(norms).all(dim=1)
        if not bool(bad.any()):
            return
        where = torch.nonzero(bad).reshape(-1).tolist()
        if self.engine.state.nonfinite == "drop":
            self._dropped_now = len(where)
            self.dropped_samples += len(where)
            return
        shown = ", ".join(str(k) for k in where[:10]) + (", ..." if len(where) > 10 else "")
        raise NonFiniteGradientError(
            f"{len(where)} of the {norms.shape[0]} samples of this logical batch (positions "
            f"{shown}, in the order the model saw them) had a non-finite (NaN or Inf) gradient; "
            "the step was refused and nothing was updated or accounted. Fix the loss or the data "
            "(log of 0, division by 0, overflow), or pass nonfinite='drop' to dp_compile to drop "
            "such samples' contributions"
        )

    def _check_finite_sums(self, grads: list[torch.Tensor]) -> None:
        norms = torch._foreach_norm(grads)
        if not bool(torch.isfinite(torch.stack([n.to(torch.float64) for n in norms])).all()):
            self.discard_batch()
            raise NonFiniteGradientError(
                "a clipped gradient sum is non-finite although non-finite samples were dropped: "
                "an op of this model propagates one sample's NaN/Inf to the sum; nothing was "
                "updated (please report this model)"
            )

    def _check_budget(self) -> None:
        state = self.engine.state
        if state.max_epsilon is None or budget_allows_step(state):
            return
        try:
            after = epsilon_after(state, 1)
        except ValueError:
            after = float("inf")
        raise PrivacyBudgetExceeded(
            budget_message(state, "the step was refused and nothing was updated or accounted"),
            epsilon_after=after, max_epsilon=state.max_epsilon, delta=float(state.target_delta or 0.0),
            steps=state.steps,
        )

    def _noisy_unclipped_count(self) -> float:
        adaptive = self.engine.state.adaptive
        if adaptive is None:
            return 0.0
        return self.engine.unclipped_count + adaptive.count_noise_std * self.noise.standard_normal()

    def _update_clip_bound(self, noisy_unclipped: float) -> None:
        state = self.engine.state
        adaptive = state.adaptive
        if adaptive is None:
            return
        fraction = noisy_unclipped / state.expected_batch_size
        bound = float(state.max_grad_norm)  # type: ignore[arg-type]
        bound *= math.exp(-adaptive.clipbound_learning_rate * (fraction - adaptive.target_unclipped_quantile))
        state.max_grad_norm = min(max(bound, adaptive.min_clipbound), adaptive.max_clipbound)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.pre_step():
            self.original_optimizer.step()
        return loss
