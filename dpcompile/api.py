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
from torch.utils.data import DataLoader

from dpcompile.accounting import available_accountants, create_accountant, get_noise_multiplier
from dpcompile.data import DPDataLoader, PhysicalBatches, StepSignal, secure_generator
from dpcompile.engine import Engine
from dpcompile.module import PrivateModule
from dpcompile.noise import NoiseSource
from dpcompile.optimizer import DPOptimizer
from dpcompile.privacy import AdaptiveClipping, PrivacyState
from passes.errors import DPCompileError


class PoissonSamplingWarning(UserWarning):
    """The reported ε assumes Poisson sampling, which this loader does not do."""


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
    """
    _check_types(model, optimizer, train_loader)
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
    steps_per_epoch = len(train_loader)
    if sample_rate is None:
        if train_loader.batch_size is not None:
            sample_rate = train_loader.batch_size / dataset_size
        else:
            sample_rate = 1 / steps_per_epoch
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")

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
    )
    signal = StepSignal()
    engine = Engine(model, state, backend=backend, batch_dim=batch_dim,  # type: ignore[arg-type]
                    max_physical_batch_size=max_physical_batch_size)
    _warm_up(engine, dataset)

    if poisson_sampling:
        loader: Any = _poisson_loader(train_loader, sample_rate, steps_per_epoch, max_physical_batch_size,
                                      signal, secure_mode)
    else:
        warnings.warn(
            "poisson_sampling=False: the reported ε assumes Poisson sampling and under-reports "
            "the privacy loss of shuffled fixed-size batches",
            PoissonSamplingWarning,
            stacklevel=2,
        )
        loader = PhysicalBatches(train_loader, max_physical_batch_size, signal)

    private_model = PrivateModule(model, engine)
    private_optimizer = DPOptimizer(optimizer, engine, signal, NoiseSource(secure_mode, noise_generator))
    return private_model, private_optimizer, loader


# ---- checks ---------------------------------------------------------------------------------


def _check_types(model: Any, optimizer: Any, loader: Any) -> None:
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
                    signal: StepSignal, secure: bool) -> DPDataLoader:
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
    generator = secure_generator() if secure else loader.generator
    return DPDataLoader(
        loader.dataset,
        sample_rate=sample_rate,
        collate_fn=loader.collate_fn,
        max_physical_batch_size=max_physical,
        generator=generator,
        steps=steps,
        signal=signal,
        **kwargs,
    )


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
