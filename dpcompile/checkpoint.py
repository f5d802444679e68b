"""Checkpoints of a private training run: the model and everything its privacy claim depends on.

``save_checkpoint(path, model, optimizer, loader)`` writes one file with the model's and the
wrapped optimizer's state, the privacy state (σ, C — the current bound under adaptive clipping —,
q, N, δ, the budget and the accountant's whole history), the Poisson sampler's generator state
and position in its epoch, the noise generators' states and the step counters.
``load_checkpoint(path, model, optimizer, loader)`` restores all of it in place onto objects
returned by ``dp_compile`` with the same settings: training continues with the same ε and the
same stream of batches (and, with a seeded ``noise_generator``, the same noise) as a run that
never stopped.

File format: a magic line, a JSON header line (format version, payload length, payload digest),
then the payload (``torch.save`` of a dict, loaded with ``weights_only=True``, so loading never
runs code from the file). The digest is SHA-256, or HMAC-SHA-256 with ``key=``: a truncated or
altered file is refused with :class:`CheckpointError` before anything is restored. SHA-256
detects corruption and careless edits; only a keyed HMAC detects a deliberate forgery (anyone
can recompute an unkeyed hash). Writes are atomic: the file is written to a temporary file in
the same directory (mode 0600), flushed and fsynced, then renamed over ``path``; a crash at any
point leaves the previous checkpoint intact.

A checkpoint is a training artifact, not a release: the sampler's generator state lets anyone
reconstruct which samples were in which batch (subsampling's privacy amplification assumes
that is secret), and the noise generator's state the noise of later steps. Keep checkpoints as
private as the training data. In ``secure_mode`` no generator state is written, and a restored
run draws fresh randomness.

Checkpoints are taken between logical batches (after ``optimizer.step()``): mid-batch, the
engine holds clipped but not yet noised gradient sums, which must never be written anywhere.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import hmac
import io
import json
import os
import tempfile
from typing import Any

import torch
from torch import nn

from dpcompile.accounting import accountant_from_state_dict
from dpcompile.data import DPDataLoader, PoissonBatchSampler
from dpcompile.distributed import ShardedPoissonBatchSampler, stream_seed
from dpcompile.module import PrivateModule
from dpcompile.optimizer import DPOptimizer

__all__ = ["CheckpointError", "CheckpointMismatchError", "load_checkpoint", "read_checkpoint",
           "save_checkpoint"]

FORMAT = "dpcompile-checkpoint"
VERSION = 1
MAGIC = b"DPCOMPILE-CHECKPOINT\n"
_MAX_HEADER = 4096

# Settings of the privacy state a resumed run must share with the checkpoint.
_MUST_MATCH = ("noise_multiplier", "sample_rate", "dataset_size", "clipping", "loss_reduction",
               "poisson_sampling", "secure_mode", "parameter_names", "adaptive")


class CheckpointError(ValueError):
    """The file is not a valid checkpoint: truncated, altered, unsigned, or of another format."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint does not belong to this model, optimizer, loader or privacy setting."""


# ---- save ---------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike[str], model: PrivateModule, optimizer: DPOptimizer,
                    loader: Any = None, *, extra: dict[str, Any] | None = None,
                    key: bytes | None = None) -> None:
    """Atomically write a checkpoint of a dp_compiled run (see the module docstring).

    ``loader`` (the one dp_compile returned) adds the sampler's state, needed to continue the
    same stream of batches. ``extra`` holds the caller's own values (epoch, metrics), restricted
    to what ``torch.load(weights_only=True)`` reads: tensors, numbers, strings, lists, dicts.
    ``key`` signs the file with HMAC-SHA-256.
    """
    engine = _engine_of(model, optimizer)
    if engine.accumulator or engine.samples_seen or not optimizer.signal.end_of_logical_batch:
        raise RuntimeError(
            "save_checkpoint in the middle of a logical batch: the clipped gradient sums of the "
            "batches seen since the last optimizer.step() are not noised yet and must never be "
            "written; save after optimizer.step() on the last physical batch"
        )
    if optimizer.job is not None and optimizer.job.rank != 0:
        return  # one file per job: every rank holds the same model, optimizer and accountant
    state = engine.state
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.original_optimizer.state_dict(),
        "optimizer_class": type(optimizer.original_optimizer).__name__,
        "privacy": state.state_dict(),
        "noise": _noise_state(optimizer),
        "counters": {"dropped_samples": int(optimizer.dropped_samples)},
        "sampler": _sampler_state(loader, state.secure_mode),
        "summary": _summary(state),
        "extra": extra if extra is not None else {},
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    header = {"format": FORMAT, "version": VERSION, "length": len(body), "digest": _digest(body, key)}
    data = MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n" + body
    _atomic_write(os.fspath(path), data)


def _atomic_write(path: str, data: bytes) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                                     dir=directory)
    try:
        with os.fdopen(fd, "wb") as handle:
            _write_all(handle, data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    with contextlib.suppress(OSError, AttributeError):  # make the rename durable (POSIX)
        directory_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(directory_fd)
        finally:
            os.close(directory_fd)


def _write_all(handle: Any, data: bytes) -> None:
    view = memoryview(data)
    step = 1 << 24
    for start in range(0, len(view), step):
        handle.write(view[start : start + step])


def _digest(body: bytes, key: bytes | None) -> str:
    if key is None:
        return "sha256:" + hashlib.sha256(body).hexdigest()
    if not isinstance(key, (bytes, bytearray)) or not key:
        raise TypeError("key must be non-empty bytes")
    return "hmac-sha256:" + hmac.new(bytes(key), body, hashlib.sha256).hexdigest()


def _summary(state: Any) -> dict[str, Any]:
    summary: dict[str, Any] = {"steps": state.steps, "delta": state.target_delta}
    if state.target_delta is not None:
        try:
            summary["epsilon"] = state.epsilon()
        except ValueError:
            summary["epsilon"] = None
    return summary


def _noise_state(optimizer: DPOptimizer) -> dict[str, Any]:
    noise = optimizer.noise
    if noise.secure:
        return {"secure": True, "generators": {}}
    return {"secure": False,
            "generators": {str(d): g.get_state() for d, g in noise.generators().items()}}


def _sampler_state(loader: Any, secure: bool) -> dict[str, Any] | None:
    if loader is None:
        return None
    if not isinstance(loader, DPDataLoader):
        return {"kind": "external", "secure": secure}
    sampler = _poisson_sampler(loader)
    generator_state = None
    stream = None
    if isinstance(sampler, ShardedPoissonBatchSampler):
        # The job's global stream: (seed, next step), the same for every rank and world size.
        consumed = loader.consumed_state
        position = int(consumed[1]) if consumed is not None and consumed[1] is not None else sampler.next_draw
        stream = {"seed": int(sampler.seed), "next_draw": position, "world_size": sampler.world_size}
    elif not sampler.secure:
        if loader.consumed_state is not None and loader.consumed_state[0] is sampler.generator:
            generator_state = loader.consumed_state[1]
        elif sampler.generator is not None:
            generator_state = sampler.generator.get_state()
        # else: the generator is created at the first iteration; nothing drawn yet
    steps = int(sampler.steps)
    return {
        "kind": "poisson",
        "secure": bool(sampler.secure),
        "generator_state": generator_state,
        "stream": stream,
        "position": int(loader.position) % steps if steps else 0,
        "logical_batches": int(loader.logical_batches),
        "steps": steps,
        "sample_rate": float(sampler.sample_rate),
        "num_samples": int(sampler.num_samples),
    }


# ---- load ---------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike[str], *, key: bytes | None = None) -> dict[str, Any]:
    """The verified contents of a checkpoint file (raises :class:`CheckpointError`)."""
    name = os.fspath(path)
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise
    if not data.startswith(MAGIC):
        raise CheckpointError(f"{name} is not a dpcompile checkpoint (no header)")
    end = data.find(b"\n", len(MAGIC), len(MAGIC) + _MAX_HEADER)
    if end < 0:
        raise CheckpointError(f"{name}: the checkpoint header is truncated or damaged")
    try:
        header = json.loads(data[len(MAGIC) : end])
        length = int(header["length"])
        digest = str(header["digest"])
        version = header["version"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{name}: the checkpoint header is damaged ({error})") from None
    if header.get("format") != FORMAT or version != VERSION:
        raise CheckpointError(
            f"{name}: checkpoint format {header.get('format')!r} version {version!r} is not "
            f"supported (this dpcompile reads {FORMAT!r} version {VERSION})"
        )
    body = data[end + 1 :]
    if len(body) < length:
        raise CheckpointError(
            f"{name} is truncated: {len(body)} of {length} payload bytes (an interrupted copy?); "
            "nothing was restored"
        )
    if len(body) > length:
        raise CheckpointError(f"{name} has {len(body) - length} unexpected trailing bytes; "
                              "nothing was restored")
    scheme = digest.split(":", 1)[0]
    if scheme == "hmac-sha256" and key is None:
        raise CheckpointError(f"{name} is signed with a key (HMAC-SHA-256): pass key=")
    if scheme == "sha256" and key is not None:
        raise CheckpointError(f"{name} is not signed, but a key was given: refusing an "
                              "unauthenticated checkpoint")
    if scheme not in ("sha256", "hmac-sha256"):
        raise CheckpointError(f"{name}: unknown digest scheme {scheme!r}")
    if not hmac.compare_digest(_digest(body, key), digest):
        raise CheckpointError(
            f"{name} failed its integrity check ({scheme}): the file was altered or corrupted"
            + (", or the key is wrong" if key is not None else "")
            + "; nothing was restored"
        )
    try:
        payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
    except Exception as error:  # a valid digest over an unreadable payload: a foreign writer
        raise CheckpointError(f"{name}: the payload cannot be read ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{name}: the payload is not a dpcompile checkpoint")
    return payload


def load_checkpoint(path: str | os.PathLike[str], model: PrivateModule, optimizer: DPOptimizer,
                    loader: Any = None, *, key: bytes | None = None) -> dict[str, Any]:
    """Restore a checkpoint in place onto dp_compiled objects; returns the saved ``extra``.

    Everything is checked before anything changes: the file's integrity, then that the
    checkpoint matches (same privacy setting, parameters, optimizer, sampler); a mismatch raises
    :class:`CheckpointMismatchError` and leaves the objects untouched. The privacy budget
    (``max_epsilon``), ``target_delta`` and the non-finite policy are this run's, not the
    checkpoint's; the accountant's history is the checkpoint's.
    """
    engine = _engine_of(model, optimizer)
    payload = read_checkpoint(path, key=key)
    name = os.fspath(path)
    state = engine.state
    saved = payload["privacy"]
    _check_privacy(name, saved, state)
    accountant = _accountant(name, saved)
    _check_model(name, payload["model"], model)
    _check_optimizer(name, payload, optimizer)
    sampler = payload.get("sampler")
    if loader is not None:
        _check_sampler(name, sampler, loader)

    backup = (
        {k: v.detach().clone() for k, v in model.state_dict().items()},
        copy.deepcopy(optimizer.original_optimizer.state_dict()),
        state.accountant, state.max_grad_norm, optimizer.dropped_samples,
    )
    try:
        model.load_state_dict(payload["model"], strict=True)
        optimizer.original_optimizer.load_state_dict(payload["optimizer"])
        state.accountant = accountant
        state.max_grad_norm = saved["max_grad_norm"]
        optimizer.dropped_samples = int(payload.get("counters", {}).get("dropped_samples", 0))
        _restore_noise(payload.get("noise") or {}, optimizer)
        if loader is not None and isinstance(loader, DPDataLoader) and sampler is not None:
            _restore_sampler(sampler, loader)
    except BaseException:
        model.load_state_dict(backup[0])
        optimizer.original_optimizer.load_state_dict(backup[1])
        state.accountant, state.max_grad_norm, optimizer.dropped_samples = backup[2:]
        raise
    optimizer.discard_batch()
    return dict(payload.get("extra") or {})


def _engine_of(model: Any, optimizer: Any) -> Any:
    if not isinstance(model, PrivateModule):
        raise TypeError(f"model must be the PrivateModule returned by dp_compile, got "
                        f"{type(model).__name__}")
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(f"optimizer must be the DPOptimizer returned by dp_compile, got "
                        f"{type(optimizer).__name__}")
    if optimizer.engine is not model._engine:
        raise ValueError("the model and the optimizer come from different dp_compile calls")
    return optimizer.engine


def _check_privacy(name: str, saved: dict[str, Any], state: Any) -> None:
    current = state.state_dict()
    differ = [k for k in _MUST_MATCH if saved.get(k) != current.get(k)]
    if saved.get("adaptive") is None and saved.get("max_grad_norm") != current.get("max_grad_norm"):
        differ.append("max_grad_norm")
    if saved["accountant"].get("name") != current["accountant"]["name"]:
        differ.append("accountant")
    elif saved["accountant"].get("settings") != current["accountant"]["settings"]:
        differ.append("accountant settings")
    if differ:
        lines = "; ".join(
            f"{k}: checkpoint {_get(saved, k)!r}, this run {_get(current, k)!r}" for k in differ
        )
        raise CheckpointMismatchError(
            f"{name} was written by a run with other privacy settings ({lines}). Resuming would "
            "change the mechanism the accountant's history describes: dp_compile with the "
            "checkpoint's settings"
        )


def _get(state: dict[str, Any], key: str) -> Any:
    if key == "accountant":
        return state["accountant"].get("name")
    if key == "accountant settings":
        return state["accountant"].get("settings")
    return state.get(key)


def _accountant(name: str, saved: dict[str, Any]) -> Any:
    try:
        return accountant_from_state_dict(saved["accountant"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{name}: the accountant history is invalid ({error})") from None


def _check_model(name: str, saved: dict[str, Any], model: nn.Module) -> None:
    current = model.state_dict()
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"{name} holds another model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, value in current.items():
        other = saved[key]
        if not isinstance(other, torch.Tensor) or other.shape != value.shape or other.dtype != value.dtype:
            got = (tuple(other.shape), other.dtype) if isinstance(other, torch.Tensor) else type(other).__name__
            raise CheckpointMismatchError(
                f"{name}: `{key}` is {got} in the checkpoint but {(tuple(value.shape), value.dtype)} "
                "in this model"
            )


def _check_optimizer(name: str, payload: dict[str, Any], optimizer: DPOptimizer) -> None:
    inner = optimizer.original_optimizer
    if payload.get("optimizer_class") != type(inner).__name__:
        raise CheckpointMismatchError(
            f"{name} holds the state of a {payload.get('optimizer_class')} optimizer, not a "
            f"{type(inner).__name__}"
        )
    saved_groups = payload["optimizer"].get("param_groups", [])
    sizes = [len(g["params"]) for g in saved_groups]
    current = [len(g["params"]) for g in inner.param_groups]
    if sizes != current:
        raise CheckpointMismatchError(
            f"{name}: the optimizer's parameter groups hold {sizes} parameters in the "
            f"checkpoint but {current} here"
        )


def _check_sampler(name: str, saved: dict[str, Any] | None, loader: Any) -> None:
    if not isinstance(loader, DPDataLoader):
        return  # the user's own loader (poisson_sampling=False): its sampler is theirs
    if saved is None or saved.get("kind") != "poisson":
        raise CheckpointMismatchError(
            f"{name} has no Poisson sampler state (it was saved without loader=): the stream "
            "of batches cannot be continued; load without loader= to accept a fresh stream"
        )
    sampler = _poisson_sampler(loader)
    if (saved["steps"] != sampler.steps or saved["sample_rate"] != sampler.sample_rate
            or saved["num_samples"] != sampler.num_samples):
        raise CheckpointMismatchError(
            f"{name}: the sampler drew {saved['steps']} batches per epoch at rate "
            f"{saved['sample_rate']:g} from {saved['num_samples']} samples; this loader draws "
            f"{sampler.steps} at {sampler.sample_rate:g} from {sampler.num_samples}"
        )
    state = saved.get("generator_state")
    if state is not None and (not isinstance(state, torch.Tensor) or state.dtype != torch.uint8):
        raise CheckpointError(f"{name}: the sampler's generator state is invalid")


def _poisson_sampler(loader: DPDataLoader) -> PoissonBatchSampler:
    sampler = loader.batch_sampler
    assert isinstance(sampler, PoissonBatchSampler)
    return sampler


def _restore_sampler(saved: dict[str, Any], loader: DPDataLoader) -> None:
    sampler = _poisson_sampler(loader)
    state = saved.get("generator_state")
    stream = saved.get("stream")
    if isinstance(sampler, ShardedPoissonBatchSampler):
        if stream is not None and not sampler.secure:
            # Any world size continues the job's global stream of batches.
            sampler.seed, sampler.next_draw = int(stream["seed"]), int(stream["next_draw"])
            loader.consumed_state = sampler.stream_state()
        else:
            loader.consumed_state = None  # a single-process checkpoint: a fresh job stream
    elif stream is not None and not sampler.secure:
        # A distributed job's checkpoint in one plain process: a stream seeded from it.
        sampler.generator = torch.Generator().manual_seed(
            stream_seed(int(stream["seed"]), int(stream["next_draw"])))
        loader.consumed_state = sampler.stream_state()
    elif state is not None and not sampler.secure:
        if sampler.generator is None:
            sampler.generator = torch.Generator()
        sampler.generator.set_state(state)
        loader.consumed_state = (sampler.generator, sampler.generator.get_state())
    else:
        loader.consumed_state = None
    position = int(saved.get("position", 0))
    loader.position = position
    sampler.next_epoch_steps = sampler.steps - position if position else None
    loader.logical_batches = int(saved.get("logical_batches", 0))
    loader.budget_exhausted = False


def _restore_noise(saved: dict[str, Any], optimizer: DPOptimizer) -> None:
    if optimizer.noise.secure or saved.get("secure"):
        return
    generators = {str(d): g for d, g in optimizer.noise.generators().items()}
    for device, state in (saved.get("generators") or {}).items():
        if device in generators:
            generators[device].set_state(state)
