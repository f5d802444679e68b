"""Gaussian noise for DP-SGD.

By default noise comes from torch's generator (seeded by ``torch.manual_seed`` unless a generator
is given): reproducible, and fine against an adversary who sees only the trained model.

How it is drawn depends on the device. On CUDA (and any device but the CPU) it is ``torch.randn``.
On the CPU, torch's sampler draws every uniform from one Mersenne Twister stream, one element at a
time: 670k float32 normals (a 784-512-512-10 MLP) took 3.5-5.8 ms on a 2-core Intel VM, half of
that model's non-private training step. So a compiled model (``backend="inductor"``) draws float32
CPU noise of at least :data:`COUNTER_MIN_NUMEL` elements from the counter-based generator of
:mod:`dpcompile.counter_noise` (Philox4x32-10 and Box-Muller, the algorithm of torch's CUDA
generator), compiled by Inductor into one vectorized, multi-threaded kernel that also adds the
noise to the clipped sums and divides by the expected batch size (1.1 ms for the same 670k, with
the addition and division, called back to back; 1.6 ms inside a training step): its key is 63
bits drawn from torch's CPU generator at every draw (one draw per step), so runs stay
reproducible from ``torch.manual_seed`` or the ``noise_generator``, and checkpoints that restore
the generator restore the noise. Both samplers turn 24-bit uniforms
into float32 Box-Muller normals; float64 noise always comes from ``torch.randn`` (53-bit uniforms).

``secure_mode=True`` (dp_compile) changes the following:

- noise generators are re-seeded with 64 bits from the operating system's CSPRNG
  (``secrets``) before every draw, never from torch's global seed and never from a generator
  the user passes (dp_compile refuses ``noise_generator`` with ``secure_mode``): the noise of one
  step cannot be replayed from a known seed nor predicted from earlier steps;
- every noise value is the sum of 4 independent normals divided by 2 (same variance). Floating-
  point samplers of a continuous distribution leave gaps and biases in the low-order bits of
  their outputs, and the low-order bits of ``value + noise`` can then reveal ``value``
  (Mironov 2012 for the Laplace mechanism; Holohan & Braghin 2021 for common Gaussian
  samplers); the sum of several independent draws fills those gaps, the usual mitigation;
- Poisson sampling draws every inclusion decision from ``os.urandom`` itself (see
  :func:`dpcompile.data.secure_poisson_indices`), not from a seeded generator;
- checkpoints store no generator state (a restored secure run draws fresh randomness).

What secure mode does *not* do: between re-seedings torch's generators (Mersenne Twister on CPU,
Philox on GPU) are not cryptographically secure streams, so the noise of one step is a
deterministic function of a 64-bit secret seed; the summation reduces but does not provably
remove floating-point leakage (there is no exact discrete Gaussian sampler here, and the
rounding in the optimizer's update is not analysed); nothing protects against side channels
(timing, memory, a debugger) on the training machine or against an adversary who can read the
process's memory. For a formal guarantee against floating-point attacks, use a library with
exact discrete Gaussian sampling.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from typing import Any

import torch

from dpcompile import counter_noise

SECURE_SUMMANDS = 4
# Below this many elements torch's sampler is as fast as a call to the compiled one.
COUNTER_MIN_NUMEL = 1 << 15


class NoiseSource:
    """Draws standard normals on each tensor's device."""

    def __init__(self, secure: bool = False, generator: torch.Generator | None = None,
                 compiled: bool = False) -> None:
        if secure and generator is not None:
            raise ValueError("secure noise cannot come from a given generator (its seed is known)")
        self.secure = secure
        self.compiled = compiled  # may draw large float32 CPU noise with the compiled counter sampler
        self._fused: dict[tuple[Any, ...], Callable[..., Any]] = {}
        self._generators: dict[torch.device, torch.Generator] = {}
        if generator is not None:
            self._generators[torch.device(generator.device)] = generator

    def generator(self, device: torch.device) -> torch.Generator | None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device in self._generators:
            return self._generators[device]
        if not self.secure:
            return None  # torch's default generator for that device
        generator = torch.Generator(device=device)
        self._generators[device] = generator
        return generator

    def _normal(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        generator = self.generator(device)
        if not self.secure:
            return torch.randn(numel, dtype=dtype, device=device, generator=generator)
        assert generator is not None
        generator.manual_seed(secrets.randbits(64))  # a fresh secret seed for every draw
        draws = torch.randn(SECURE_SUMMANDS, numel, dtype=dtype, device=device, generator=generator)
        return draws.sum(0) / (SECURE_SUMMANDS**0.5)

    def normal_like(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Standard normal noise shaped like each tensor, drawn in one call per device/dtype."""
        out: list[torch.Tensor | None] = [None] * len(tensors)
        for (device, dtype), members in self._groups(tensors).items():
            sizes = [tensors[k].numel() for k in members]
            flat = self._normal(sum(sizes), dtype, device)
            for k, piece in zip(members, flat.split(sizes)):
                out[k] = piece.view_as(tensors[k])
        return out  # type: ignore[return-value]

    def add_noise_(self, tensors: list[torch.Tensor], std: float, denominator: float = 1.0) -> None:
        """``t <- (t + std·z) / denominator`` in place for every tensor, ``z`` standard normals
        like :meth:`normal_like`'s (one draw per device and dtype); no draw when ``std`` is 0."""
        for (device, dtype), members in self._groups(tensors).items():
            group = [tensors[k] for k in members]
            if std and self._counter_based(sum(t.numel() for t in group), dtype, device):
                self._fused_noise(group)(self._counter_seed(), torch.tensor(float(std)),
                                         torch.tensor(float(denominator)), *group)
                continue
            if std:
                torch._foreach_add_(group, self.normal_like(group), alpha=std)
            if denominator != 1:
                torch._foreach_div_(group, denominator)

    def _counter_based(self, numel: int, dtype: torch.dtype, device: torch.device) -> bool:
        return (self.compiled and not self.secure and numel >= COUNTER_MIN_NUMEL
                and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.float16, torch.bfloat16))

    def _counter_seed(self) -> torch.Tensor:
        """The counter-based sampler's key: 63 bits from the CPU generator (torch's default one
        when none was given), so the stream follows that generator's seed and state."""
        return torch.empty((), dtype=torch.int64).random_(generator=self.generator(torch.device("cpu")))

    def _fused_noise(self, group: list[torch.Tensor]) -> Callable[..., Any]:
        """The compiled in-place ``(t + std·z) / denominator`` for tensors laid out like ``group``."""
        key = tuple((t.shape, t.stride(), t.dtype) for t in group)
        fused = self._fused.get(key)
        if fused is None:
            from passes.lower import compile_function

            example = [torch.zeros((), dtype=torch.int64), torch.ones(()), torch.ones(())]
            fused = compile_function(_noised, example + group)
            self._fused[key] = fused
        return fused

    def _groups(self, tensors: list[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[int]]:
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(k)
        return groups

    def generators(self) -> dict[torch.device, torch.Generator]:
        """The explicit generators by device (empty when torch's default ones are used)."""
        return dict(self._generators)

    def standard_normal(self) -> float:
        return float(self._normal(1, torch.float64, torch.device("cpu"))[0])


def _noised(seed: torch.Tensor, std: torch.Tensor, denominator: torch.Tensor,
            *tensors: torch.Tensor) -> list[torch.Tensor]:
    """``t <- (t + std·z) / denominator`` in place, ``z`` the counter stream of ``seed``: what
    :meth:`NoiseSource.add_noise_` compiles."""
    for t, z in zip(tensors, counter_noise.normal_like(seed, list(tensors))):
        t.copy_((t + std * z) / denominator)
    return []
