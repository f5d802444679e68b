"""Counter-based Gaussian noise: a pure function of (seed, element index), in integer tensor ops.

An exported private step must be a pure function of its inputs, so its noise cannot come from
a stateful generator (``torch.randn(..., generator=g)`` does not export portably). Here every
noise value is computed from the seed and its position alone:

- Philox4x32-10 (Salmon, Moraes, Dror, Shaw 2011, "Parallel random numbers: as easy as 1, 2, 3")
  maps a 128-bit counter and a 64-bit key to 128 random bits in ten rounds of 32x32->64-bit
  multiplications, xors and key increments. The key is the 64-bit seed; the counter of block
  ``j`` is ``(j mod 2^32, j div 2^32, stream, 0)``.
- Box-Muller turns each block's four 32-bit words into four standard normals, so element ``i``
  of the flattened noise is lane ``i mod 4`` of block ``i div 4``.

Everything runs as int64 tensor arithmetic on 32-bit words (a 32x32-bit product is one int64
multiplication that may wrap past 2^63; only its two 32-bit halves are used), so the graph
exports with ``torch.export``, compiles with Inductor / AOTInductor, and gives the same integers
on any device (tests check eager, Inductor and exported words against Python integers). The normals
are computed in float32 (``log``, ``cos``, ``sin``): bit-identical wherever the same kernels run
(the live step and the exported program on the same device); across devices they may differ in
the last bits of the transcendental functions.

Uniforms use the top 24 bits of a word, so the normals are exact float32 Box-Muller values with
|z| <= sqrt(2·ln 2^24) ≈ 5.77: the Gaussian tail beyond that (probability ~8e-9 per coordinate)
is cut off, as with generators that draw float32 uniforms (torch's CUDA ``randn`` among them).
Like any seeded generator this is not a cryptographic stream: the privacy of the noise rests on
the seed being secret and never reused.
"""

from __future__ import annotations

import math

import torch

MASK32 = 0xFFFFFFFF
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9  # key increments (golden ratio, sqrt(3) - 1)
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
GENERATOR_NAME = "philox4x32-10/box-muller-f32"
GENERATOR_VERSION = 1


def _mulhilo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit halves of ``constant * x`` for 32-bit ``constant`` and ``x`` (int64)."""
    # One int64 multiplication: the product is below 2^64, and where it passes 2^63 it wraps to
    # a negative int64 whose 64 bits are still the product's (two's complement, as int64
    # multiplication behaves in ATen's kernels, Inductor's C++ and Triton); the arithmetic shift
    # then smears the sign into the top half, which the mask drops. A third faster on CPU than
    # assembling the product from two overflow-free 32x16-bit halves.
    product = x * constant
    return (product >> 32) & MASK32, product & MASK32


def philox4x32(counter: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
               key: tuple[torch.Tensor, torch.Tensor],
               rounds: int = PHILOX_ROUNDS) -> tuple[torch.Tensor, ...]:
    """Philox4x32 on int64 tensors holding 32-bit words (broadcasting); returns four words."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def random_words(seed: torch.Tensor, blocks: int, stream: int = 0) -> tuple[torch.Tensor, ...]:
    """The four random 32-bit words (int64, one tensor per word) of counter blocks 0..blocks-1
    under ``seed``."""
    seed = seed.to(torch.int64).reshape(())
    key = (seed & MASK32, (seed >> 32) & MASK32)  # two's complement bits of a negative seed too
    index = torch.arange(blocks, dtype=torch.int64, device=seed.device)
    counter = (index & MASK32, index >> 32, torch.full_like(index, stream & MASK32),
               torch.zeros_like(index))
    return philox4x32(counter, key)


def standard_normal(seed: torch.Tensor, numel: int, dtype: torch.dtype = torch.float32,
                    stream: int = 0) -> torch.Tensor:
    """``numel`` standard normals, a pure function of the int64 tensor ``seed`` (on its device)."""
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    blocks = -(-numel // 4)
    # Word by word, each a contiguous tensor, interleaved only at the end: Inductor then
    # vectorizes the transcendental functions (on CPU 3x faster than from a (blocks, 4) layout,
    # whose strided lanes it computed one element at a time).
    scale = 2.0**-24
    top = [(w >> 8).to(torch.float32) for w in random_words(seed, blocks, stream)]  # exact: < 2^24
    normals = []
    for first, second in ((top[0], top[1]), (top[2], top[3])):
        radius = torch.sqrt(-2.0 * torch.log((first + 1.0) * scale))  # u1 in (0, 1]: log is finite
        angle = (2.0 * math.pi) * (second * scale)  # u2 in [0, 1)
        normals += [radius * torch.cos(angle), radius * torch.sin(angle)]
    # block j: lanes (z0, z1) from words (0, 1), (z2, z3) from words (2, 3)
    return torch.stack(normals, dim=1).reshape(-1)[:numel].to(dtype)


def normal_like(seed: torch.Tensor, tensors: list[torch.Tensor], stream: int = 0) -> list[torch.Tensor]:
    """Standard normal noise shaped like each tensor: one stream over all of them, in order.

    Tensor ``k`` takes elements ``[o_k, o_k + numel_k)`` of the flattened stream, ``o_k`` the
    total size of the tensors before it, so the noise of a parameter depends only on the seed
    and the sizes of the parameters listed before it.
    """
    sizes = [t.numel() for t in tensors]
    flat = standard_normal(seed, sum(sizes), torch.float32, stream)
    out = []
    for t, piece in zip(tensors, flat.split(sizes)):
        out.append(piece.to(dtype=t.dtype, device=t.device).reshape(t.shape))
    return out
