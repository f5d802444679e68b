"""Export a dp_compiled model's complete private training step as a ``torch.export`` program.

The exported program is the pure function

    step(params, buffers, inputs, targets, mask, seed)
        -> {"loss": (), "per_sample_loss": (B,), "update": {name: tensor}}

for one physical batch of ``B`` rows (``B`` fixed at export time; ``mask`` marks the real
rows, padding rows get 0). It runs the model's forward, the per-sample loss, the rewritten
private backward (per-sample norms, clipping, clipped sums: the compiler's passes), then adds
counter-based Gaussian noise (:mod:`dpcompile.counter_noise`) drawn from ``seed`` and scales:

    update = (Σ_b c_b·g_b + σ_Δ·C·z(seed)) / (q·N)       (loss_reduction="mean"; no division for "sum")

which is what :class:`dpcompile.DPOptimizer` puts in ``p.grad`` (for SGD: ``p -= lr·update``).
``params`` holds every parameter by ``named_parameters()`` name (frozen ones included),
``buffers`` every buffer; the clip bound, noise standard deviation and denominator are buffers of
the program, and the privacy metadata (JSON) is the uint8 buffer ``dpcompile_metadata``. Only
``update`` is differentially private; the losses are for monitoring on the trusted side.

``save`` writes a ``.pt2`` archive (``torch.export.save``) with the metadata also stored as the
extra file ``dpcompile.json``, so that ``load`` can check the format before deserializing.
"""

from __future__ import annotations

import copy
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from dpcompile import counter_noise
from dpcompile.module import PrivateModule
from dpcompile.privacy import PrivacyState
from passes import analyze, capture, private_backward
from passes.grad_forms import aten_only
from passes.rewrite import PrivateGraph, example_private_inputs

FORMAT_NAME = "dpcompile.private_step"
FORMAT_VERSION = 1
METADATA_FILE = "dpcompile.json"
METADATA_BUFFER = "dpcompile_metadata"
OUTPUT_KEYS = ("loss", "per_sample_loss", "update")

Batch = tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]


class ArtifactError(ValueError):
    """A file or program that is not a usable dpcompile artifact."""


# ---- inputs -----------------------------------------------------------------------------------


def _as_tensors(value: Any, what: str) -> tuple[torch.Tensor, ...]:
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    for k, v in enumerate(values):
        if not isinstance(v, torch.Tensor):
            raise TypeError(f"{what} {k} is a {type(v).__name__}; the batch must hold tensors")
    return values


def split_batch(batch: Any) -> Batch:
    """``(inputs, targets)``: each a tensor or a tuple of tensors (the model gets ``*inputs``,
    the loss ``loss_fn(output, *targets)``)."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "the batch must be a pair (inputs, targets), each a tensor or a tuple of tensors, "
            f"e.g. (x, y) or ((tokens, lengths), y); got {type(batch).__name__}"
            + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
        )
    inputs = _as_tensors(batch[0], "input")
    targets = _as_tensors(batch[1], "target")
    if not inputs:
        raise TypeError("the batch has no inputs for the model")
    return inputs, targets


def per_sample_loss(loss_fn: Any) -> Callable[..., torch.Tensor]:
    """A function ``(output, *targets) -> (B,)`` from a per-sample loss or a torch criterion.

    A criterion module with a ``reduction`` attribute (``nn.CrossEntropyLoss()``, ``nn.MSELoss()``,
    ...) is run with ``reduction="none"`` and reduced per sample over its non-batch dimensions the
    way its own reduction would (mean or sum). Any other callable must return one loss per sample.
    """
    if isinstance(loss_fn, nn.Module) and isinstance(getattr(loss_fn, "reduction", None), str):
        criterion = copy.copy(loss_fn)
        reduce_mean = loss_fn.reduction != "sum"
        setattr(criterion, "reduction", "none")  # noqa: B010 (nn.Module.__setattr__ typing)

        def loss(output: Any, *targets: torch.Tensor) -> torch.Tensor:
            value = criterion(output, *targets)
            if value.dim() <= 1:
                return value
            flat = value.reshape(value.shape[0], -1)
            return flat.mean(1) if reduce_mean else flat.sum(1)

        return loss
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    return loss_fn  # type: ignore[no-any-return]


def _require_private(model: Any, what: str) -> PrivateModule:
    if not isinstance(model, PrivateModule):
        kind = type(model).__name__
        raise TypeError(
            f"{what} needs a model returned by dpcompile.dp_compile (a dpcompile.PrivateModule), "
            f"got {kind}: the privacy parameters (noise multiplier, clipping bound, sample rate, "
            "accountant) come from dp_compile(model, optimizer, loader, ...)"
        )
    return model


def _seed_tensor(seed: Any, device: torch.device) -> torch.Tensor:
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex():
            raise TypeError(f"seed must be an integer scalar, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        return seed.to(device=device, dtype=torch.int64).reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if not -(2**63) <= seed < 2**63:
        raise ValueError(f"seed must fit in 64 bits (signed), got {seed}")
    return torch.tensor(seed, dtype=torch.int64, device=device)


def _mask_tensor(mask: Any, batch: int, ref: torch.Tensor) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, dtype=ref.dtype, device=ref.device)
    mask = torch.as_tensor(mask, device=ref.device)
    if tuple(mask.shape) != (batch,):
        raise ValueError(f"mask must have shape ({batch},) (one entry per row), got {tuple(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("mask must hold 0 (padding row) or 1 (real row)")
    return mask.to(ref.dtype)


# ---- the step's arithmetic, shared by the live and the exported step ----------------------------


def noisy_update(sums: list[torch.Tensor], seed: torch.Tensor, noise_std: torch.Tensor,
                 denominator: torch.Tensor) -> list[torch.Tensor]:
    """``(s + noise_std·z) / denominator`` per tensor, ``z`` the counter-based normals of ``seed``."""
    noise = counter_noise.normal_like(seed, sums)
    return [(s + z * noise_std.to(s.dtype)) / denominator.to(s.dtype) for s, z in zip(sums, noise)]


def _masked_mean(losses: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(losses.dtype)
    return (losses * weights).sum() / weights.sum().clamp(min=1)


def _step_constants(state: PrivacyState) -> tuple[float, float]:
    """(noise standard deviation per coordinate, denominator) as DPOptimizer uses them."""
    denominator = state.expected_batch_size if state.loss_reduction == "mean" else 1.0
    return float(state.noise_std), float(denominator)


# ---- the live step ------------------------------------------------------------------------------


def private_step(model: PrivateModule, batch: Any, *, loss_fn: Any, seed: int | torch.Tensor,
                 mask: torch.Tensor | None = None) -> dict[str, Any]:
    """One private step on the live model, without exporting and without changing its state.

    Runs the model's own compiled training graphs (the ones ``loss.backward()`` uses), then the
    same noise and scaling as the exported step: ``dpcompile.load(path)(batch, seed=s)`` returns
    the same ``update`` for the same parameters, batch, mask and seed. Parameters, ``.grad``,
    the optimizer and the accountant are left untouched.
    """
    model = _require_private(model, "private_step")
    engine = model._engine
    state = engine.state
    inputs, targets = split_batch(batch)
    loss = per_sample_loss(loss_fn)
    trainable = engine.trainable()
    ref = trainable[0][1]
    count = engine.batch_size(list(inputs))
    weights = _mask_tensor(mask, count, ref)
    seed_t = _seed_tensor(seed, ref.device)

    saved = ({k: v.clone() for k, v in engine.accumulator.items()}, engine.unclipped_count,
             engine.samples_seen)
    engine.reset()
    try:
        with torch.enable_grad():
            losses = loss(model(*inputs), *targets)
            if tuple(losses.shape) != (count,):
                raise ValueError(
                    f"loss_fn must return one loss per sample, shape ({count},); got "
                    f"{tuple(losses.shape)} (use reduction='none')"
                )
            weighted = losses * weights.to(losses.dtype)
            # The engine reads a mean loss as 1/count of each sample's loss.
            objective = weighted.mean() if state.loss_reduction == "mean" else weighted.sum()
            grads = torch.autograd.grad(objective, [p for _, p in trainable], allow_unused=True)
    finally:
        engine.reset()
        engine.accumulator.update(saved[0])
        engine.unclipped_count, engine.samples_seen = saved[1], saved[2]
    sums = [g.detach() if g is not None else torch.zeros_like(p) for g, (_, p) in zip(grads, trainable)]
    noise_std, denominator = _step_constants(state)
    updates = noisy_update(
        sums, seed_t,
        torch.tensor(noise_std, dtype=torch.float64, device=ref.device),
        torch.tensor(denominator, dtype=torch.float64, device=ref.device),
    )
    losses = losses.detach()
    return {
        "loss": _masked_mean(losses, weights),
        "per_sample_loss": losses,
        "update": {name: u for (name, _), u in zip(trainable, updates)},
    }


# ---- the exported step --------------------------------------------------------------------------


class PrivateStepProgram(nn.Module):
    """The module ``torch.export`` traces: the whole private step, parameters as inputs."""

    max_grad_norm: torch.Tensor
    noise_std: torch.Tensor
    denominator: torch.Tensor

    def __init__(self, private: PrivateGraph, num_inputs: int, clip: torch.Tensor, noise_std: float,
                 denominator: float, metadata: Mapping[str, Any]) -> None:
        super().__init__()
        cap = private.capture
        self.graph_module = private.graph_module
        self.trainable = list(cap.trainable)
        self.frozen = list(cap.frozen)
        self.buffer_names = list(cap.buffers)
        self.grad_names = private.params_with_grads
        self.num_inputs = num_inputs
        self.batch_size = cap.batch_size
        self.loss_dtype = cap.example_inputs[-1].dtype  # the seed of the per-sample losses
        self.mask_dtype = cap.example_inputs[0].dtype
        self.register_buffer("max_grad_norm", clip)
        self.register_buffer("noise_std", torch.tensor(noise_std, dtype=torch.float64, device=clip.device))
        self.register_buffer("denominator", torch.tensor(denominator, dtype=torch.float64, device=clip.device))
        encoded = json.dumps(metadata, sort_keys=True).encode()
        self.register_buffer(METADATA_BUFFER, torch.tensor(list(encoded), dtype=torch.uint8))

    def forward(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor],
                inputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...],
                mask: torch.Tensor, seed: torch.Tensor) -> dict[str, Any]:
        ref = params[self.trainable[0]]
        mask = mask.to(dtype=self.mask_dtype, device=ref.device)
        ones = torch.ones(self.batch_size, dtype=self.loss_dtype, device=ref.device)
        flat = [
            *(params[n] for n in self.trainable),
            *(params[n] for n in self.frozen),
            *(buffers[n] for n in self.buffer_names),
            *inputs,
            *targets,
            ones,
            mask,
            self.max_grad_norm,
        ]
        out = self.graph_module(*flat)
        losses = out[0]
        clipped = dict(zip(self.grad_names, out[2:]))
        sums = [clipped[n] if n in clipped else torch.zeros_like(params[n]) for n in self.trainable]
        updates = noisy_update(sums, seed.to(ref.device), self.noise_std, self.denominator)
        return {
            "loss": _masked_mean(losses, mask),
            "per_sample_loss": losses,
            "update": dict(zip(self.trainable, updates)),
        }


def loss_private_graph(module: nn.Module, inputs: Sequence[torch.Tensor], loss: Callable[..., torch.Tensor],
                       targets: Sequence[torch.Tensor], *, batch_dim: int = 0,
                       clipping: str = "flat") -> PrivateGraph:
    """The compiler's passes on forward + per-sample loss + backward, in the module's current
    train/eval mode (as the training graphs are traced): capture → analyze → private_backward."""
    cap = capture(module, inputs, loss, targets, batch_dim=batch_dim)
    analysis = analyze(cap)
    example = example_private_inputs(cap)
    if clipping == "per_layer":
        example[-1] = example[-1].expand(len(cap.grad_for)).clone()
    return private_backward(cap, analysis, clipping, example)  # type: ignore[arg-type]


def export(model: PrivateModule, example_batch: Any, *, loss_fn: Any,
           strict: bool = False) -> torch.export.ExportedProgram:
    """The complete private training step of a dp_compiled ``model`` as an ExportedProgram.

    ``example_batch = (inputs, targets)`` fixes the physical batch size ``B`` (at least 2) and
    the shapes and dtypes; ``loss_fn(model(*inputs), *targets)`` returns one loss per sample, or
    is a criterion such as ``nn.CrossEntropyLoss()`` (run with ``reduction="none"``). The program
    is called as ``ep.module()(params, buffers, inputs, targets, mask, seed)`` (see the module
    docstring); its example inputs (stored in the ``.pt2`` file) hold the current parameters.
    The privacy metadata is :func:`metadata` of the program. The step is traced in the model's
    current train/eval mode, as its training graphs are. Nothing about the model changes.
    """
    model = _require_private(model, "dpcompile.export")
    engine = model._engine
    state = engine.state
    inputs, targets = split_batch(example_batch)
    batch = engine.batch_size(list(inputs))
    if batch < 2:
        raise ValueError(
            "the example batch needs at least 2 rows (one sample cannot be told apart from a "
            "reshaped dimension); pad it with copies and pass mask=0 for them when running"
        )
    for k, t in enumerate(targets):
        if t.dim() == 0 or t.shape[0] != batch:
            raise ValueError(f"target {k} has shape {tuple(t.shape)}; it needs {batch} rows (dimension 0)")
    module = model.module
    clipping = "per_layer" if state.clipping == "per_layer" else "flat"
    with aten_only():  # the program must load without dpcompile
        private = loss_private_graph(module, inputs, per_sample_loss(loss_fn), targets,
                                     batch_dim=engine.batch_dim, clipping=clipping)
    _warn_random_ops(private)

    ref = private.capture.example_inputs[0]
    grad_names = private.params_with_grads
    if isinstance(state.max_grad_norm, list):
        by_name = dict(zip(state.parameter_names, state.max_grad_norm))
        clip = torch.tensor([by_name[n] for n in grad_names], dtype=ref.dtype, device=ref.device)
    else:
        clip = torch.tensor(float(state.max_grad_norm), dtype=ref.dtype, device=ref.device)
    noise_std, denominator = _step_constants(state)
    meta = build_metadata(model, private, inputs, targets, noise_std, denominator)
    program = PrivateStepProgram(private, len(inputs), clip, noise_std, denominator, meta)

    params = {n: p.detach() for n, p in module.named_parameters()}
    buffers = {n: b.detach() for n, b in module.named_buffers()}
    mask = torch.ones(batch, dtype=ref.dtype, device=ref.device)
    seed = torch.zeros((), dtype=torch.int64, device=ref.device)
    args = (params, buffers, tuple(t.detach() for t in inputs), tuple(t.detach() for t in targets), mask, seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\._export.*")
        return torch.export.export(program, args, strict=strict)


def _draws_random_numbers(node: torch.fx.Node) -> bool:
    if node.op != "call_function" or torch.Tag.nondeterministic_seeded not in getattr(node.target, "tags", ()):
        return False
    names = [a.name for a in node.target._schema.arguments]  # type: ignore[union-attr]
    if "dropout_p" in names:  # attention kernels: random only with dropout
        k = names.index("dropout_p")
        p = node.args[k] if k < len(node.args) else node.kwargs.get("dropout_p", 0.0)
        return bool(p)
    return True


def _warn_random_ops(private: PrivateGraph) -> None:
    random_ops = sorted({
        str(n.target) for n in private.graph_module.graph.nodes if _draws_random_numbers(n)
    })
    if random_ops:
        warnings.warn(
            f"the model draws random numbers ({', '.join(random_ops)}: dropout in training mode?); "
            "the exported step draws them from torch's generator, not from its seed, so it is "
            "not a pure function of its inputs and will not reproduce the live step",
            stacklevel=3,
        )


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _tensor_spec(t: torch.Tensor) -> dict[str, Any]:
    return {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}


def build_metadata(model: PrivateModule, private: PrivateGraph, inputs: Sequence[torch.Tensor],
                   targets: Sequence[torch.Tensor], noise_std: float, denominator: float) -> dict[str, Any]:
    """The privacy metadata stored in the program and next to it (plain JSON types)."""
    import dpcompile

    state = model.privacy
    epsilon: float | str | None = None
    if state.target_delta is not None:
        epsilon = _finite(state.epsilon())
    accountant = state.accountant.state_dict()
    module = model.module
    custom_ops = sorted({
        n.target.namespace for n in private.graph_module.graph.nodes
        if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)
        and n.target.namespace not in ("aten", "prims")
    })
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "dpcompile_version": dpcompile.__version__,
        "torch_version": torch.__version__,
        "privacy": {
            "noise_multiplier": state.noise_multiplier,
            "gradient_noise_multiplier": state.gradient_noise_multiplier,
            "max_grad_norm": state.max_grad_norm,
            "clip_norm": state.clip_norm,
            "noise_std": noise_std,
            "sample_rate": state.sample_rate,
            "dataset_size": state.dataset_size,
            "expected_batch_size": state.expected_batch_size,
            "delta": state.target_delta,
            "epsilon": epsilon,
            "steps": state.steps,
            "accountant": accountant["name"],
            "accountant_history": accountant["history"],
            "clipping": state.clipping,
            "loss_reduction": state.loss_reduction,
            "poisson_sampling": state.poisson_sampling,
            "secure_mode": state.secure_mode,
            "adaptive_clipping": dict(state.adaptive.__dict__) if state.adaptive is not None else None,
        },
        "privacy_state": state.state_dict(),
        "step": {
            "batch_size": private.capture.batch_size,
            "denominator": denominator,
            "noise_generator": {
                "name": counter_noise.GENERATOR_NAME,
                "version": counter_noise.GENERATOR_VERSION,
                "order": "trainable parameters in named_parameters() order, each flattened",
            },
            "parameters": [
                {"name": n, "trainable": p.requires_grad, **_tensor_spec(p)}
                for n, p in module.named_parameters()
            ],
            "buffers": [{"name": n, **_tensor_spec(b)} for n, b in module.named_buffers()],
            "inputs": [_tensor_spec(t) for t in inputs],
            "targets": [_tensor_spec(t) for t in targets],
            "batch_dim": model._engine.batch_dim,
            "training_mode": module.training,
            "outputs": list(OUTPUT_KEYS),
            "norm_strategies": {n: plan.strategy for n, plan in private.plans.items()},
            "custom_op_namespaces": custom_ops,
        },
    }


def metadata(program: torch.export.ExportedProgram) -> dict[str, Any]:
    """The dpcompile metadata inside an exported program (raises ArtifactError if there is none)."""
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram, got {type(program).__name__}")
    raw = program.state_dict.get(METADATA_BUFFER)
    if raw is None:
        raise ArtifactError(
            "this ExportedProgram has no dpcompile metadata: it was not made by dpcompile.export"
        )
    return _check_metadata(json.loads(bytes(raw.cpu().tolist()).decode()), "the program")


def _check_metadata(meta: Any, where: str) -> dict[str, Any]:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ArtifactError(f"{where} is not a dpcompile artifact (no '{FORMAT_NAME}' metadata)")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise ArtifactError(
            f"{where} is a dpcompile artifact in format version {version!r} (written by dpcompile "
            f"{meta.get('dpcompile_version', '?')} with torch {meta.get('torch_version', '?')}); "
            f"this dpcompile reads format version {FORMAT_VERSION}: export it again with this version"
        )
    return meta


# ---- files --------------------------------------------------------------------------------------


def save(path: str | os.PathLike[str], program: torch.export.ExportedProgram) -> str:
    """Write a program from :func:`export` to ``path`` (a ``.pt2`` archive); returns the path."""
    meta = metadata(program)
    path = os.fspath(path)
    torch.export.save(program, path, extra_files={METADATA_FILE: json.dumps(meta, sort_keys=True)})
    return path


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The metadata of a saved artifact, read without deserializing the program."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise ArtifactError(
            f"{path} is not a dpcompile artifact: not a .pt2 archive (dpcompile.save writes the "
            "zip archive of torch.export.save)"
        )
    with zipfile.ZipFile(path) as archive:
        names = [n for n in archive.namelist() if n.split("/")[-2:] == ["extra", METADATA_FILE]]
        if not names:
            raise ArtifactError(
                f"{path} is not a dpcompile artifact: the archive has no {METADATA_FILE} (a plain "
                "torch.export program loads with torch.export.load; dpcompile.save writes artifacts)"
            )
        raw = archive.read(names[0])
    try:
        meta = json.loads(raw.decode())
    except ValueError as error:
        raise ArtifactError(f"{path}: its {METADATA_FILE} is not valid JSON ({error})") from error
    return _check_metadata(meta, path)


class ExportedStep:
    """A loaded private step: call it like the live :func:`private_step`.

    ``step(batch, seed=s)`` uses the parameters and buffers stored in the artifact;
    ``step(batch, seed=s, params=..., buffers=...)`` uses others (same names, shapes, dtypes).
    ``program`` is the ExportedProgram, ``metadata`` its privacy metadata (a dict), and
    ``privacy_state()`` rebuilds the :class:`~dpcompile.PrivacyState` to continue accounting.
    """

    def __init__(self, program: torch.export.ExportedProgram, meta: dict[str, Any]) -> None:
        self.program = program
        self.metadata = meta
        self._module: nn.Module | None = None

    @property
    def batch_size(self) -> int:
        return int(self.metadata["step"]["batch_size"])

    def example_inputs(self) -> tuple[Any, ...]:
        """(params, buffers, inputs, targets, mask, seed) stored with the program."""
        stored = self.program.example_inputs
        if stored is None:
            raise ArtifactError("the program carries no example inputs (parameters)")
        return tuple(stored[0])

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return dict(self.example_inputs()[0])

    @property
    def buffers(self) -> dict[str, torch.Tensor]:
        return dict(self.example_inputs()[1])

    def privacy_state(self) -> PrivacyState:
        return PrivacyState.from_state_dict(self.metadata["privacy_state"])

    def __call__(self, batch: Any, *, seed: int | torch.Tensor, params: Mapping[str, torch.Tensor] | None = None,
                 buffers: Mapping[str, torch.Tensor] | None = None, mask: torch.Tensor | None = None) -> dict[str, Any]:
        inputs, targets = split_batch(batch)
        stored = self.example_inputs()
        step = self.metadata["step"]
        param_names = [p["name"] for p in step["parameters"]]
        buffer_names = [b["name"] for b in step["buffers"]]
        params = stored[0] if params is None else params
        buffers = stored[1] if buffers is None else buffers
        missing = [n for n in param_names if n not in params] + [n for n in buffer_names if n not in buffers]
        if missing:
            raise ValueError(f"missing parameters or buffers: {missing}")
        ordered_params = {n: params[n] for n in param_names}
        ordered_buffers = {n: buffers[n] for n in buffer_names}
        ref = ordered_params[param_names[0]]
        rows = inputs[0].shape[step["batch_dim"]] if inputs[0].dim() > step["batch_dim"] else None
        if rows != self.batch_size:
            raise ValueError(
                f"this step was exported for batches of {self.batch_size} rows, got {rows}: pad the "
                "batch to that size and pass mask (1 for real rows, 0 for padding)"
            )
        mask_t = _mask_tensor(mask, self.batch_size, stored[4])
        seed_t = _seed_tensor(seed, ref.device)
        if self._module is None:
            self._module = self.program.module()
        return self._module(ordered_params, ordered_buffers, inputs, targets, mask_t, seed_t)  # type: ignore[no-any-return]

    def __repr__(self) -> str:
        privacy = self.metadata["privacy"]
        return (
            f"ExportedStep(batch_size={self.batch_size}, noise_multiplier={privacy['noise_multiplier']:g}, "
            f"max_grad_norm={privacy['max_grad_norm']}, sample_rate={privacy['sample_rate']:g}, "
            f"accountant={privacy['accountant']!r}, steps={privacy['steps']})"
        )


def load(path: str | os.PathLike[str]) -> ExportedStep:
    """Load an artifact written by :func:`save`: a runnable step with ``.metadata``."""
    meta = read_metadata(path)
    try:
        program = torch.export.load(os.fspath(path))
    except Exception as error:
        raise ArtifactError(
            f"{os.fspath(path)}: torch {torch.__version__} could not load the program (saved with "
            f"torch {meta.get('torch_version', '?')} by dpcompile {meta.get('dpcompile_version', '?')}): "
            f"{type(error).__name__}: {error}"
        ) from error
    inner = metadata(program)
    if inner != meta:
        raise ArtifactError(f"{os.fspath(path)}: the metadata file and the program's metadata disagree")
    return ExportedStep(program, meta)
