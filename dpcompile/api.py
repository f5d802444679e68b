"""``dp_compile``: one call turns a model, optimizer and loader into their private versions."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils._pytree import tree_flatten
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler

from dpcompile.accounting import available_accountants, create_accountant, get_noise_multiplier
from dpcompile.budget import check_budget_argument, epsilon_after
from dpcompile.data import DPDataLoader, PhysicalBatches, StepSignal
from dpcompile.distributed import (
    DistributedJob,
    ShardedPoissonBatchSampler,
    distributed_job,
    local_expected_batch_size,
)
from dpcompile.distributed import steps_per_epoch as job_steps_per_epoch
from dpcompile.engine import Engine
from dpcompile.module import PrivateModule
from dpcompile.noise import NoiseSource
from dpcompile.optimizer import DPOptimizer
from dpcompile.privacy import AdaptiveClipping, PrivacyState
from dpcompile.validate import ModelValidationError, buffer_update_problems, structural_problems
from passes.errors import DPCompileError


class PoissonSamplingWarning(UserWarning):
    """The reported ε assumes Poisson sampling, which this loader does not do."""


class SampleRateWarning(UserWarning):
    """An explicit sample_rate far from the loader's batch size over the dataset size."""


# Samplers that only order the data set: uniform over all samples, each sample once per epoch.
_UNIFORM_SAMPLERS = (SequentialSampler, RandomSampler, DistributedSampler)


def dp_compile(
    model: nn.Module,
    optimizer: Optimizer,
    train_loader: DataLoader,
    *,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    target_delta: float = 1e-5,
    epochs: int | None = None,
    max_grad_norm: float | Sequence[float] = 1.0,
    clipping: str = "flat",
    accountant: str = "prv",
    poisson_sampling: bool = True,
    max_physical_batch_size: int | None = None,
    loss_reduction: str = "mean",
    secure_mode: bool = False,
    sample_rate: float | None = None,
    backend: str = "inductor",
    batch_dim: int = 0,
    noise_generator: torch.Generator | None = None,
    adaptive_clipping: AdaptiveClipping | dict[str, float] | None = None,
    max_epsilon: float | None = None,
    nonfinite: str = "error",
    low_memory: bool = False,
    distributed: bool | None = None,
    process_group: Any = None,
) -> tuple[PrivateModule, DPOptimizer, Any]:
    """Make ``model``, ``optimizer`` and ``train_loader`` train with DP-SGD.

    Returns ``(model, optimizer, loader)`` to use in an unchanged training loop. Each logical
    batch is Poisson-sampled with rate ``sample_rate`` (default: the loader's batch size over the
    dataset size); every sample's gradient is clipped to ``max_grad_norm`` inside the compiled
    backward; the optimizer adds Gaussian noise ``N(0, σ²C²)`` once per logical batch and
    divides by the expected batch size. ``model.privacy`` holds σ, C, q, the step count and the
    accountant (``model.privacy.epsilon(delta)``).

    Give exactly one of ``noise_multiplier`` (σ) and ``target_epsilon`` (then σ is calibrated
    for ``epochs`` epochs at ``target_delta``). ``max_grad_norm`` may be a list with one bound
    per trainable parameter (per-layer clipping). ``clipping="adaptive"`` adapts C to a quantile
    of the per-sample norms (Andrew et al. 2021) with its own noisy count, accounted for.
    ``backend="eager"`` runs the same rewritten graphs without Inductor, for debugging.
    ``low_memory=True`` computes flat clipping's clipped sums with a second backward pass (from
    the loss scaled per sample by its clip factor) instead of keeping every layer's backward
    signals until the clip factors are known: about one more backward of time for a peak close
    to non-private training's; per-layer clipping and ``nonfinite="drop"`` ignore it.

    Safety (docs/safety.md): the model is validated first (``dpcompile.validate``; all problems
    are listed in one :class:`ModelValidationError`). ``max_epsilon`` (at ``target_delta``) is a
    budget: the optimizer refuses a step that would exceed it (``PrivacyBudgetExceeded``, raised
    before anything is updated) and the loader stops before such a step. ``nonfinite`` is the
    policy for a sample whose gradient is NaN/Inf: ``"error"`` (refuse the step) or ``"drop"``
    (that sample contributes nothing). ``secure_mode=True`` draws noise and batches from
    generators seeded by the operating system's CSPRNG (see ``dpcompile.noise``).

    Distributed training (docs/distributed.md): a model wrapped in ``DistributedDataParallel``,
    or ``distributed=True`` with an initialised process group (``process_group`` picks one),
    trains one private model across the ranks: each rank clips its Poisson shard, the clipped
    sums are summed across ranks, noise is added once for the whole job, and the update is
    divided by the global expected batch size. The loader's ``batch_size`` is then per rank
    (the global expected batch is ``world_size`` times it), as with a ``DistributedSampler``.
    """
    _check_types(model, optimizer, train_loader)
    # A torch.compile'd model: dpcompile traces and compiles the module itself.
    model = getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model
    model, job = distributed_job(model, distributed, process_group)
    world_size = job.world_size if job is not None else 1
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError("give exactly one of noise_multiplier and target_epsilon")
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
    if clipping not in ("flat", "per_layer", "adaptive"):
        raise ValueError(f"clipping must be 'flat', 'per_layer' or 'adaptive', got {clipping!r}")
    if accountant not in available_accountants():
        raise ValueError(f"unknown accountant {accountant!r}; known: {available_accountants()}")
    if backend not in ("inductor", "eager"):
        raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
    if not 0 < target_delta < 1:
        raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
    if max_physical_batch_size is not None and max_physical_batch_size < 1:
        raise ValueError(f"max_physical_batch_size must be positive, got {max_physical_batch_size}")
    if nonfinite not in ("error", "drop"):
        raise ValueError(f"nonfinite must be 'error' or 'drop', got {nonfinite!r}")
    max_epsilon = check_budget_argument(max_epsilon)
    if secure_mode and noise_generator is not None:
        raise ValueError(
            "secure_mode=True draws noise from generators seeded by the operating system's "
            "CSPRNG; a noise_generator (whose seed is known) would defeat it: pass one or the other"
        )
    problems = structural_problems(model)
    if problems:
        raise ModelValidationError(problems)

    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameters")
    _check_optimizer(model, optimizer)
    bounds, clipping = _clip_bounds(max_grad_norm, clipping, [n for n, _ in trainable])

    dataset = train_loader.dataset
    try:
        dataset_size = len(dataset)  # type: ignore[arg-type]
    except TypeError as error:
        raise ValueError(
            "the train loader's dataset has no length: DP-SGD's sample rate and accounting need "
            "the number of samples (use a map-style Dataset)"
        ) from error
    if dataset_size < 1:
        raise ValueError("the train loader's dataset is empty")
    _check_sampler(train_loader, poisson_sampling)
    if job is not None and not poisson_sampling:
        _check_disjoint_fixed_batches(train_loader, job, dataset_size)
    steps_per_epoch = len(train_loader)
    sample_rate = _sample_rate(train_loader, sample_rate, dataset_size, steps_per_epoch,
                               poisson_sampling, _replicas(train_loader, world_size))
    if job is not None:
        steps_per_epoch = job_steps_per_epoch(sample_rate)

    if target_epsilon is not None:
        if epochs is None or epochs <= 0:
            raise ValueError("target_epsilon needs epochs (a positive number of epochs) to calibrate σ")
        noise_multiplier = get_noise_multiplier(
            target_epsilon, target_delta, sample_rate, steps=int(epochs) * steps_per_epoch,
            accountant=accountant,
        )
    assert noise_multiplier is not None
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")

    adaptive = None
    if clipping == "adaptive":
        adaptive = adaptive_clipping if isinstance(adaptive_clipping, AdaptiveClipping) else AdaptiveClipping(**(adaptive_clipping or {}))
        if adaptive.count_noise_std <= 0:
            adaptive.count_noise_std = sample_rate * dataset_size / 20
        adaptive.gradient_noise_multiplier(noise_multiplier)  # raises if the budget is too small

    state = PrivacyState(
        noise_multiplier=float(noise_multiplier),
        max_grad_norm=bounds,
        sample_rate=float(sample_rate),
        dataset_size=dataset_size,
        accountant=create_accountant(accountant),
        clipping=clipping,
        target_delta=target_delta,
        loss_reduction=loss_reduction,
        poisson_sampling=poisson_sampling,
        secure_mode=secure_mode,
        adaptive=adaptive,
        parameter_names=[n for n, _ in trainable],
        max_epsilon=max_epsilon,
        nonfinite=nonfinite,
    )
    if max_epsilon is not None:
        first = epsilon_after(state, 1)
        if first > max_epsilon:
            raise ValueError(
                f"max_epsilon={max_epsilon:g} is below the ε of a single step ({first:.4g} at "
                f"δ={target_delta:g} with noise_multiplier={noise_multiplier:g}, sample_rate="
                f"{sample_rate:g}): no step could be taken; raise the budget or the noise"
            )
    if job is not None:
        job.check_same_job(model, _job_settings(state, accountant, train_loader, poisson_sampling))
    signal = StepSignal()
    engine = Engine(model, state, backend=backend, batch_dim=batch_dim,  # type: ignore[arg-type]
                    max_physical_batch_size=max_physical_batch_size, low_memory=low_memory,
                    expected_batch_size=local_expected_batch_size(state.expected_batch_size, job))
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        _warm_up(engine, dataset)
    finally:
        # Compiling runs the forward: undo what it did to buffers (counters, statistics).
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers and b.shape == buffers[name].shape:
                    b.copy_(buffers[name])
    problems = [p for step in engine._steps.values() for p in buffer_update_problems(step.capture, model)]
    if problems:
        raise ModelValidationError(problems)

    if poisson_sampling:
        loader: Any = _poisson_loader(train_loader, sample_rate, steps_per_epoch, max_physical_batch_size,
                                      signal, secure_mode, state, job)
    else:
        warnings.warn(
            "poisson_sampling=False: the reported ε assumes Poisson sampling and under-reports "
            "the privacy loss of shuffled fixed-size batches",
            PoissonSamplingWarning,
            stacklevel=2,
        )
        loader = PhysicalBatches(train_loader, max_physical_batch_size, signal, state)

    private_model = PrivateModule(model, engine)
    noise = NoiseSource(secure_mode, noise_generator, compiled=backend == "inductor")
    private_optimizer = DPOptimizer(optimizer, engine, signal, noise, job)
    return private_model, private_optimizer, loader


# ---- checks ---------------------------------------------------------------------------------


def _check_types(model: Any, optimizer: Any, loader: Any) -> None:
    if isinstance(model, tuple) and model and isinstance(model[0], nn.Module):
        raise TypeError(
            "model must be a torch.nn.Module, got a tuple: dpcompile.fix(model) returns "
            "(fixed_model, changes); pass the first element"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, PrivateModule):
        raise ValueError("this model is already dp_compiled")
    if not isinstance(optimizer, Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(optimizer, DPOptimizer):
        raise ValueError("this optimizer is already dp_compiled")
    if not isinstance(loader, DataLoader):
        raise TypeError(f"train_loader must be a torch.utils.data.DataLoader, got {type(loader).__name__}")


def _check_optimizer(model: nn.Module, optimizer: Optimizer) -> None:
    owned = {id(p) for p in model.parameters()}
    for g, group in enumerate(optimizer.param_groups):
        for k, p in enumerate(group["params"]):
            if id(p) not in owned:
                raise ValueError(
                    f"the optimizer's parameter {k} of group {g} (shape {tuple(p.shape)}) is not a "
                    f"parameter of the model {type(model).__name__}: build the optimizer from "
                    "model.parameters()"
                )


def _check_sampler(loader: DataLoader, poisson_sampling: bool) -> None:
    """Refuse samplers whose inclusion probabilities differ from the accounted uniform rate."""
    batch_sampler = loader.batch_sampler
    sampler = loader.sampler
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        problem = f"a custom batch_sampler ({type(batch_sampler).__name__})"
    elif not isinstance(sampler, _UNIFORM_SAMPLERS):
        problem = f"the sampler {type(sampler).__name__}"
    elif isinstance(sampler, RandomSampler) and (
        sampler.replacement or sampler._num_samples is not None
    ):
        problem = "a RandomSampler with replacement or num_samples"
    else:
        return
    if poisson_sampling:
        consequence = (
            "dp_compile replaces the loader's sampling with Poisson sampling of every sample at "
            "one rate, so it would silently drop this sampler's choices (weights, subsets)"
        )
    else:
        consequence = (
            "it gives samples different inclusion probabilities (or repeats them), which the "
            "accountant's single sample rate does not cover: the reported ε would be wrong"
        )
    raise ValueError(
        f"the train loader uses {problem}: {consequence}. Use a plain DataLoader "
        "(shuffle=True or False) over the data set you want to train on: to train on a "
        "subset, pass a Subset; to weight samples, weight their losses (clipping still bounds "
        "each sample's influence)"
    )


def _replicas(loader: DataLoader, world_size: int) -> int:
    """How many processes share the data set: each sees ``1/replicas`` of it per epoch. A
    DistributedSampler says so itself (even in a job that is not distributed for dpcompile)."""
    sampler = loader.sampler
    return int(sampler.num_replicas) if isinstance(sampler, DistributedSampler) else world_size


def _check_disjoint_fixed_batches(loader: DataLoader, job: DistributedJob, dataset_size: int) -> None:
    """Fixed batches across ranks must partition the data set, or one sample's gradient could
    enter one step from several ranks (sensitivity above C, ε under-reported)."""
    sampler = loader.sampler
    if not isinstance(sampler, DistributedSampler) or sampler.num_replicas != job.world_size \
            or sampler.rank != job.rank:
        raise ValueError(
            "poisson_sampling=False in a distributed job needs a DistributedSampler for this rank "
            f"(num_replicas={job.world_size}, rank={job.rank}): otherwise ranks may put the same "
            "sample in the same step and its influence exceeds max_grad_norm. Use "
            "DataLoader(dataset, batch_size=..., sampler=DistributedSampler(dataset)), or leave "
            "poisson_sampling=True (dpcompile then shards the data itself)"
        )
    if not sampler.drop_last and dataset_size % job.world_size:
        raise ValueError(
            f"the DistributedSampler pads {dataset_size} samples to a multiple of "
            f"{job.world_size} ranks by repeating samples, so a repeated sample would count twice "
            "in an epoch: pass DistributedSampler(..., drop_last=True)"
        )


def _sample_rate(loader: DataLoader, sample_rate: float | None, dataset_size: int,
                 steps_per_epoch: int, poisson_sampling: bool, replicas: int = 1) -> float:
    """The accounted q: given, or the loader's batch size (per process) times the number of
    processes sharing the data set over its size; checked."""
    implied = None
    if loader.batch_size is not None:
        implied = min(1.0, loader.batch_size * replicas / dataset_size)
    elif steps_per_epoch:
        implied = 1 / steps_per_epoch
    if sample_rate is None:
        if implied is None:
            raise ValueError("cannot infer the sample rate from the loader: pass sample_rate=")
        sample_rate = implied
    elif implied is not None:
        if not poisson_sampling and sample_rate < implied * (1 - 1e-9):
            raise ValueError(
                f"sample_rate={sample_rate:g} is below the loader's batch_size / len(dataset) = "
                f"{implied:g}: with poisson_sampling=False the loader's fixed batches include each "
                "sample at that rate, and accounting a smaller one would under-report ε"
            )
        if poisson_sampling and not 0.5 <= sample_rate / implied <= 2:
            warnings.warn(
                f"sample_rate={sample_rate:g} differs from the loader's batch_size / len(dataset) "
                f"= {implied:g}: batches will hold {sample_rate * dataset_size:.4g} samples on "
                "average and the loader's batch_size is ignored",
                SampleRateWarning,
                stacklevel=3,
            )
    sample_rate = float(sample_rate)
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if sample_rate * dataset_size < 1:
        raise ValueError(
            f"sample_rate={sample_rate:g} over {dataset_size} samples gives an expected batch of "
            f"{sample_rate * dataset_size:.3g} < 1 sample: most steps would be noise only, and the "
            "update is divided by this expected size. Use a larger sample_rate"
        )
    return sample_rate


def _clip_bounds(max_grad_norm: Any, clipping: str, names: list[str]) -> tuple[float | list[float], str]:
    if isinstance(max_grad_norm, (list, tuple)):
        bounds = [float(c) for c in max_grad_norm]
        if len(bounds) != len(names):
            raise ValueError(
                f"max_grad_norm lists {len(bounds)} bounds for {len(names)} trainable parameters "
                f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''}): give one per "
                "trainable parameter, in model.named_parameters() order"
            )
        if any(not (math.isfinite(c) and c > 0) for c in bounds):
            raise ValueError(f"every max_grad_norm must be a finite number > 0, got {bounds}")
        if clipping == "adaptive":
            raise ValueError("adaptive clipping adapts one bound: give max_grad_norm as one float")
        return bounds, "per_layer"
    bound = float(max_grad_norm)
    if not (math.isfinite(bound) and bound > 0):
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm}")
    if clipping == "per_layer":
        # One total bound split evenly: every sample's whole gradient stays within C.
        share = bound / math.sqrt(len(names))
        return [share] * len(names), "per_layer"
    return bound, clipping


def _poisson_loader(loader: DataLoader, sample_rate: float, steps: int, max_physical: int | None,
                    signal: StepSignal, secure: bool, privacy: PrivacyState,
                    job: DistributedJob | None = None) -> DPDataLoader:
    kwargs: dict[str, Any] = dict(
        num_workers=loader.num_workers,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return DPDataLoader(
        loader.dataset,
        sample_rate=sample_rate,
        collate_fn=loader.collate_fn,
        max_physical_batch_size=max_physical,
        generator=None if secure else loader.generator,
        steps=steps,
        signal=signal,
        secure=secure,
        privacy=privacy,
        poisson_sampler=None if job is None else ShardedPoissonBatchSampler(
            len(loader.dataset), sample_rate, steps, rank=job.rank,  # type: ignore[arg-type]
            world_size=job.world_size, seed=job.seed, secure=secure),
        **kwargs,
    )


def _job_settings(state: PrivacyState, accountant: str, loader: DataLoader,
                  poisson_sampling: bool) -> dict[str, Any]:
    """What every rank of a distributed job must agree on."""
    import dpcompile

    sampler = loader.sampler
    # Fixed batches: ranks partition one permutation only if they draw it alike.
    fixed_batches = None if poisson_sampling or not isinstance(sampler, DistributedSampler) else (
        sampler.shuffle, sampler.seed, sampler.drop_last)
    return {
        "fixed_batches": fixed_batches,
        "noise_multiplier": state.noise_multiplier, "max_grad_norm": state.max_grad_norm,
        "sample_rate": state.sample_rate, "dataset_size": state.dataset_size,
        "clipping": state.clipping, "accountant": accountant, "target_delta": state.target_delta,
        "loss_reduction": state.loss_reduction, "poisson_sampling": state.poisson_sampling,
        "secure_mode": state.secure_mode, "max_epsilon": state.max_epsilon,
        "nonfinite": state.nonfinite, "parameter_names": state.parameter_names,
        "adaptive": None if state.adaptive is None else dict(state.adaptive.__dict__),
        "dpcompile": dpcompile.__version__, "torch": torch.__version__,
    }


def _warm_up(engine: Engine, dataset: Any) -> None:
    """Compile (and so validate) the model on a batch built from the first samples.

    The model's inputs are guessed as the first element of a (input, target) sample; when the
    guess does not fit the model, compilation waits for the first training batch.
    """
    try:
        first = [dataset[k] for k in range(min(2, len(dataset)))]
        from torch.utils.data._utils.collate import default_collate

        batch = default_collate(first)
    except Exception:
        return
    inputs = batch[0] if isinstance(batch, (tuple, list)) and len(batch) > 1 else batch
    leaves, _ = tree_flatten(inputs)
    if not leaves or not all(isinstance(t, torch.Tensor) for t in leaves):
        return
    device = _device(engine.module)
    args = tuple(t.to(device) for t in leaves)
    try:
        engine.warm_up(args)
    except DPCompileError:
        raise
    except Exception:
        return


def _device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")
