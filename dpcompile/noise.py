"""Gaussian noise for DP-SGD.

By default noise comes from torch's generator (seeded by ``torch.manual_seed`` unless a generator
is given): reproducible, and fine against an adversary who sees only the trained model.

``secure_mode=True`` changes two things:

- the generators are seeded from the operating system's CSPRNG (``secrets``), never from
  torch's global seed, so the noise cannot be replayed from a known seed;
- every noise value is the sum of 4 independent normals divided by 2 (same variance). Floating
  point samplers leave gaps and biases in the low-order bits that can reveal the unrounded
  value added to (Mironov 2012 for the Laplace mechanism; Holohan & Braghin 2021 for Gaussian
  samplers); summing several independent samples smooths the low bits of the result, the
  mitigation Opacus and Google's libraries also use.

What secure mode does *not* do: torch's generator (Philox / Mersenne Twister) is not a
cryptographically secure stream once seeded, the summation trick reduces but does not provably
remove floating-point leakage, and nothing here protects against side channels (timing, memory)
on the training machine. For a formal guarantee against those, use a library with exact discrete
Gaussian sampling.
"""

from __future__ import annotations

import secrets

import torch

SECURE_SUMMANDS = 4


class NoiseSource:
    """Draws standard normals on each tensor's device."""

    def __init__(self, secure: bool = False, generator: torch.Generator | None = None) -> None:
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
        generator.manual_seed(secrets.randbits(63))
        self._generators[device] = generator
        return generator

    def _normal(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        generator = self.generator(device)
        if not self.secure:
            return torch.randn(numel, dtype=dtype, device=device, generator=generator)
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

    def standard_normal(self) -> float:
        return float(self._normal(1, torch.float64, torch.device("cpu"))[0])
