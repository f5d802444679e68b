"""Gaussian noise for DP-SGD.

By default noise comes from torch's generator (seeded by ``torch.manual_seed`` unless a generator
is given): reproducible, and fine against an adversary who sees only the trained model.

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

import torch

SECURE_SUMMANDS = 4


class NoiseSource:
    """Draws standard normals on each tensor's device."""

    def __init__(self, secure: bool = False, generator: torch.Generator | None = None) -> None:
        if secure and generator is not None:
            raise ValueError("secure noise cannot come from a given generator (its seed is known)")
        self.secure = secure
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
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for k, t in enumerate(tensors):
            groups.setdefault((t.device, t.dtype), []).append(k)
        for (device, dtype), members in groups.items():
            sizes = [tensors[k].numel() for k in members]
            flat = self._normal(sum(sizes), dtype, device)
            for k, piece in zip(members, flat.split(sizes)):
                out[k] = piece.view_as(tensors[k])
        return out  # type: ignore[return-value]

    def generators(self) -> dict[torch.device, torch.Generator]:
        """The explicit generators by device (empty when torch's default ones are used)."""
        return dict(self._generators)

    def standard_normal(self) -> float:
        return float(self._normal(1, torch.float64, torch.device("cpu"))[0])
