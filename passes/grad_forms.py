"""Per-sample gradient forms: how one use of a parameter contributes to each sample's gradient.

A parameter gradient in a traced backward is a sum over samples. The per-sample rules
(``passes/per_sample_rules.py``) turn each reducing node into one of these forms, which keep the
per-sample structure without necessarily materializing a ``(B, *param.shape)`` tensor:

- :class:`Outer` — ``G_b = Σ_t rows[b,t] ⊗ cols[b,t]`` (linear layers, convolutions after
  unfolding, RNN weights over time steps), optionally block-diagonal over ``groups``;
- :class:`Lookup` — ``G_b = Σ_t e_{index[b,t]} ⊗ cols[b,t]`` (embedding tables);
- :class:`Scattered` — entry ``(index[b,t,c], c)`` receives ``values[b,t,c]`` (max-mode bags);
- :class:`Dense` — the per-sample gradients themselves, ``(B, *shape)``.

:func:`combine_sq_norms` computes ``‖Σ_uses G_b‖²`` for every sample, cross terms between uses
included, choosing per parameter between ghost norms and materialization by cost.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from passes.sample_dims import SampleDim

# Materializing more than this many per-sample gradient elements for one parameter is refused
# in favour of ghost norms, whatever the flop count says (about 1 GiB in float32).
MATERIALIZE_ELEMENT_LIMIT = 1 << 28
# Cost model: one tensor element written or read costs about this many flops (memory-bound
# passes on CPU; a rough figure that ranks the choices right on the benchmark models).
MEMORY_WEIGHT = 16
# Up to this many positions per sample, embedding norms use the (T x T) equality trick;
# beyond it, sorting (sample, index) keys and summing runs is cheaper (measured with Inductor at
# B=256, D=100: T=64 1.2 ms against 5.0 ms; T=256 33 ms against 20 ms).
LOOKUP_GHOST_MAX_POSITIONS = 128
# On CPU a convolution's per-sample weight gradients are produced this many samples per grouped
# backward call: oneDNN's grouped backward-weight allocates scratch that grows with the groups, and
# buffers past glibc's mmap threshold (32 MiB) are page-faulted afresh on every step. Measured on
# the CIFAR-10 CNN at B=256 (64→64 channels, 8×8): one call 25–42 ms with 27k page faults per call,
# 16 samples per call 6.8 ms and none; 32 per call already faults again. GPUs take one call.
CONV_SAMPLES_PER_CALL_CPU = 16
# ... unless the whole batch's per-sample gradients are this small: then one call (each call's
# input slice is another kernel for Inductor to compile; the CIFAR-10 CNN's first layer, 0.9 MB
# at B=256, is as fast in one call as in 16).
CONV_ONE_CALL_BYTES_CPU = 4 << 20
# A convolution whose per-sample gradients are more than this many times larger than its input
# and output gradient together does not hold them until the clip factors exist: its norms come
# from the per-sample gradients block by block (each block dead once reduced), and its clipped
# sum from one more backward-weight call on the output gradient scaled by the clip factors.
# Measured on the CIFAR-10 CNN at B=256: the third layer (64→64, 8×8) has 36 MiB of per-sample
# gradients against 8 MiB of input and output gradient; deferring it took the tensors live at the
# step's peak 161 → 121 MiB and the resident peak 370 → 338 MB, at no cost in step time (the
# summed backward-weight call replaces the weighted sum over 36 MiB). The second layer (18 MiB
# against 24) keeps its gradients: deferring it too raised the live peak to 135 MiB.
CONV_DEFER_RATIO = 2.0
# On CPU, per-sample gradients from unfolded windows are made this many bytes of windows at a time,
# in one opaque call (``dpcompile::conv_window_grads``), so that one block's windows, sized for the
# cache, exist at once. Written as graph ops, Inductor fused every block's window gather into one
# kernel and kept all the windows live: 27 MiB at the CIFAR-10 CNN's first layer (3→32, 32×32,
# B=256), which stayed live at the private step's peak.
CONV_WINDOW_BLOCK_BYTES_CPU = 2 << 20


def pad_both_sides(padding: tuple[int, ...]) -> list[int]:
    """A convolution's per-dimension padding as ``F.pad``'s list (last dimension first)."""
    pad: list[int] = []
    for p in reversed(padding):
        pad += [p, p]
    return pad


_ATEN_ONLY = contextvars.ContextVar("dpcompile_aten_only_forms", default=False)


@contextlib.contextmanager
def aten_only() -> Iterator[None]:
    """Forms built inside write aten ops only, no ``dpcompile::`` kernel: for graphs that must
    load and compile without dpcompile (exported programs)."""
    token = _ATEN_ONLY.set(True)
    try:
        yield
    finally:
        _ATEN_ONLY.reset(token)


class GradForm:
    """One use's contribution to every sample's gradient, standing for a ``(B, *shape)`` tensor."""

    shape: tuple[int, ...]
    rule = ""  # the per-sample rule that produced it ("mm", "convolution", "vmap:<op>", ...)

    @property
    def batch(self) -> int:
        raise NotImplementedError

    def view(self, shape: tuple[int, ...]) -> GradForm:
        raise NotImplementedError

    def transpose(self) -> GradForm | None:
        return None

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError


@dataclass
class Dense(GradForm):
    values: torch.Tensor  # (B, *shape)
    note: str = ""  # how the values were made, when worth reporting (``explain``)

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape[1:])

    @property
    def batch(self) -> int:
        return int(self.values.shape[0])

    def view(self, shape: tuple[int, ...]) -> GradForm:
        return Dense(self.values.reshape(self.batch, *shape), note=self.note)

    def transpose(self) -> GradForm | None:
        return Dense(self.values.transpose(-1, -2), note=self.note)

    def materialize(self) -> torch.Tensor:
        return self.values

    def sq_norm(self) -> torch.Tensor:
        return self.values.pow(2).reshape(self.batch, -1).sum(1)


@dataclass
class Outer(GradForm):
    """``G_b = Σ_t rows[b,t] ⊗ cols[b,t]`` per group. The factors may be strided views (an
    unfolded input, a transposed activation): products go through ``bmm`` on views, which BLAS
    reads in either orientation, so the large factors are never copied into a new layout."""

    rows: torch.Tensor  # (B, T, G, R)
    cols: torch.Tensor  # (B, T, G, C)
    shape: tuple[int, ...]  # layout (G, R, C), row-major, viewed as `shape`

    @property
    def batch(self) -> int:
        return int(self.rows.shape[0])

    @property
    def dims(self) -> tuple[int, int, int, int]:
        _, t, g, r = self.rows.shape
        return int(t), int(g), int(r), int(self.cols.shape[-1])

    def view(self, shape: tuple[int, ...]) -> GradForm:
        return Outer(self.rows, self.cols, tuple(shape))

    def transpose(self) -> GradForm | None:
        t, g, r, c = self.dims
        if g != 1 or len(self.shape) != 2:
            return None
        return Outer(self.cols, self.rows, (self.shape[1], self.shape[0]))

    def ghost_cost(self) -> tuple[int, int]:
        """(flops, memory elements) of the ghost norm."""
        t, g, r, c = self.dims
        if t == 1:
            return self.batch * g * (r + c), self.batch * g
        return self.batch * g * t * t * (r + c), 2 * self.batch * g * t * t

    def materialize_cost(self) -> tuple[int, int]:
        t, g, r, c = self.dims
        return self.batch * t * g * r * c, self.batch * g * r * c

    def prefers_ghost(self) -> bool:
        """Ghost O(B·T²·(R+C)) against materialized O(B·T·R·C), memory traffic included."""
        return _prefers_ghost(self.ghost_cost(), self.materialize_cost())

    def sq_norm(self) -> torch.Tensor:
        """Ghost norm: Σ_g Σ_{t,s} ⟨rows_t, rows_s⟩·⟨cols_t, cols_s⟩."""
        t = self.rows.shape[1]
        if t == 1:
            r2 = self.rows.pow(2).sum(-1)
            c2 = self.cols.pow(2).sum(-1)
            return (r2 * c2).reshape(self.batch, -1).sum(1)
        rows, cols = _groups_first(self.rows), _groups_first(self.cols)
        gram_rows = torch.bmm(rows, rows.transpose(1, 2))  # (B·G, T, T)
        gram_cols = torch.bmm(cols, cols.transpose(1, 2))
        return (gram_rows * gram_cols).reshape(self.batch, -1).sum(1)

    def materialize(self) -> torch.Tensor:
        rows, cols = _groups_first(self.rows), _groups_first(self.cols)
        per_sample = torch.bmm(rows.transpose(1, 2), cols)  # (B·G, R, C)
        return per_sample.reshape(self.batch, *self.shape)

    def compatible(self, other: Outer) -> bool:
        return self.dims[1:] == other.dims[1:] and math.prod(self.shape) == math.prod(other.shape)


def _prefers_ghost(ghost: tuple[int, int], materialized: tuple[int, int]) -> bool:
    """Pick by flops + MEMORY_WEIGHT·elements; never materialize past the memory limit."""
    (ghost_flops, ghost_mem), (mat_flops, mat_mem) = ghost, materialized
    if mat_mem > MATERIALIZE_ELEMENT_LIMIT and ghost_mem < mat_mem:
        return True
    if ghost_mem > MATERIALIZE_ELEMENT_LIMIT and mat_mem < ghost_mem:
        return False
    return ghost_flops + MEMORY_WEIGHT * ghost_mem <= mat_flops + MEMORY_WEIGHT * mat_mem


@dataclass
class Convolution(GradForm):
    """A convolution's per-sample weight gradients, kept as (input, output gradient).

    Materializing uses the convolution's own backward-weight kernel once, with the samples as
    groups (input viewed as ``(frames, B·C_in, *S)``, ``groups = B·g``): no unfolded copy of the
    input. When the input windows are no wider than the output channels (few input channels, or
    a 1×1 kernel) the unfolded windows and a batched GEMM are cheaper (:attr:`unfolds_windows`);
    one ``dpcompile::conv_window_grads`` call makes them a block of samples at a time.
    Ghost norms, worth it when there are few positions per sample, come from the Grams of the
    input's and the output gradient's positions (:meth:`sq_norm`), or from unfolded windows
    (:meth:`as_outer`) when those are narrower.
    """

    x: torch.Tensor  # (N, C_in, *S_in), N = o·B·i
    grad: torch.Tensor  # (N, C_out, *S_out)
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    transposed: bool
    output_padding: tuple[int, ...]
    groups: int
    sample: SampleDim
    batch_size: int
    shape: tuple[int, ...]
    # the per-sample bias gradients come out of the weight's calls (see :meth:`per_sample_bias`)
    with_bias: bool = False
    rule = "convolution"

    @property
    def batch(self) -> int:
        return self.batch_size

    def view(self, shape: tuple[int, ...]) -> GradForm:
        return dataclasses.replace(self, shape=tuple(shape))

    @property
    def dims(self) -> tuple[int, int, int, int]:
        """(T, G, R, C): positions per sample, groups, and the outer-product sides per group."""
        frames = self.sample.outer * self.sample.inner
        kernel = math.prod(self.weight_shape[2:])
        g = self.groups
        if not self.transposed:
            positions = math.prod(self.grad.shape[2:])
            r, c = self.weight_shape[0] // g, self.weight_shape[1] * kernel
        else:
            positions = math.prod(self.x.shape[2:])
            r, c = self.weight_shape[0] // g, self.weight_shape[1] * kernel
        return frames * positions, g, r, c

    def ghost_cost(self) -> tuple[int, int]:
        """The cheaper of the two ghost norms (see :attr:`uses_position_grams`)."""
        return self.gram_ghost_cost() if self.uses_position_grams else self.unfolded_ghost_cost()

    def unfolded_ghost_cost(self) -> tuple[int, int]:
        """Ghost norm over unfolded windows (:meth:`as_outer`): their (T × T) Gram is the cost."""
        t, g, r, c = self.dims
        return self.batch * g * t * t * (r + c), self.batch * g * (2 * t * t + t * c)

    def gram_ghost_cost(self) -> tuple[int, int]:
        """Ghost norm from position Grams (:meth:`sq_norm`): the input's (P × P) Gram, the output
        gradient's (T × T) Gram, and one product per kernel offset."""
        t, g, r, _ = self.dims
        p = self.sample.outer * self.sample.inner * math.prod(self._windowed.shape[2:])
        channels, kernel = self.weight_shape[1], math.prod(self.weight_shape[2:])
        flops = self.batch * g * (p * p * channels + t * t * r + kernel * t * t)
        return flops, self.batch * g * (p * p + t * t)

    @property
    def uses_position_grams(self) -> bool:
        """Ghost norms from position Grams rather than unfolded windows: cheaper when a window is
        wide and the input has few positions (the CIFAR-10 CNN's third and fourth layers: 64
        channels, 3×3, 8×8 and 4×4), where unfolding copies every input element once per kernel
        offset."""
        gram, unfolded = self.gram_ghost_cost(), self.unfolded_ghost_cost()
        return gram[0] + MEMORY_WEIGHT * gram[1] < unfolded[0] + MEMORY_WEIGHT * unfolded[1]

    @property
    def _windowed(self) -> torch.Tensor:
        """The tensor whose windows meet each position: the input, or for a transposed
        convolution the output gradient."""
        return self.grad if self.transposed else self.x

    def materialize_cost(self) -> tuple[int, int]:
        t, g, r, c = self.dims
        return self.batch * t * g * r * c, self.batch * g * r * c

    def prefers_ghost(self) -> bool:
        return _prefers_ghost(self.ghost_cost(), self.materialize_cost())

    def sq_norm(self) -> torch.Tensor:
        """Ghost norm, from position Grams or unfolded windows (:attr:`uses_position_grams`)."""
        return self.position_gram_sq_norm() if self.uses_position_grams else self.as_outer().sq_norm()

    def position_gram_sq_norm(self) -> torch.Tensor:
        """Ghost norm without unfolded windows:
        ``‖G_b‖² = Σ_{t,t'} ⟨g_t, g_t'⟩ · Σ_κ ⟨x_{s·t+d·κ}, x_{s·t'+d·κ}⟩`` per group, the window
        Gram being a sum over kernel offsets κ of strided blocks of the input's position Gram,
        zero-padded (frames of a sample count as more positions)."""
        windowed, positions = self._windowed, (self.x if self.transposed else self.grad)
        frames = self.sample.outer * self.sample.inner
        in_size, out_size = tuple(windowed.shape[2:]), tuple(positions.shape[2:])
        lead = (self.batch * self.groups, frames)
        window_gram = self._position_gram(windowed).view(*lead, *in_size, frames, *in_size)
        grad_gram = self._position_gram(positions).view(*lead, *out_size, frames, *out_size)
        if all(s == 1 for s in self.stride):
            summed = self._offsets_summed(grad_gram, in_size, out_size)
            return (summed * window_gram).reshape(self.batch, -1).sum(1)
        # the Gram of the zero-padded input is the Gram zero-padded (a pad Inductor fuses into
        # the products below, where padding the input would copy it)
        pad = pad_both_sides(self.padding)
        if any(pad):
            window_gram = torch.nn.functional.pad(window_gram, [*pad, 0, 0, *pad])
        sq = None
        for offset in self._kernel_offsets():
            block = tuple(slice(d * o, d * o + s * (n - 1) + 1, s)
                          for o, d, s, n in zip(offset, self.dilation, self.stride, out_size))
            term = window_gram[_both_positions(block)] * grad_gram
            term = term.reshape(self.batch, -1).sum(1)
            sq = term if sq is None else sq + term
        assert sq is not None
        return sq

    def _offsets_summed(self, grad_gram: torch.Tensor, in_size: tuple[int, ...],
                        out_size: tuple[int, ...]) -> torch.Tensor:
        """For stride 1, the offsets moved to the output side: ``Σ_κ grad_gram[u+p−d·κ, u'+p−d·κ]``
        at input positions u, u' (zero outside), so that one product with the unpadded input Gram
        remains: on CPU one vectorized kernel, where a product per offset on the lazily padded
        input Gram compiled to a scalar, masked loop (CIFAR-10's third layer: 1.9 against 4.1 ms)."""
        reach = [d * (k - 1) for d, k in zip(self.dilation, self.weight_shape[2:])]
        pad: list[int] = []  # output positions extended to reach - p before and after the input's span
        for r, p, n_in, n_out in reversed(list(zip(reach, self.padding, in_size, out_size))):
            pad += [r - p, n_in - n_out + p]
        extended = torch.nn.functional.pad(grad_gram, [*pad, 0, 0, *pad])
        summed = None
        for offset in self._kernel_offsets():
            block = tuple(slice(r - d * o, r - d * o + n) for r, d, o, n in zip(reach, self.dilation, offset, in_size))
            term = extended[_both_positions(block)]
            summed = term if summed is None else summed + term
        assert summed is not None
        return summed

    def _kernel_offsets(self) -> Iterator[tuple[int, ...]]:
        """Every kernel offset κ, one index per spatial dimension."""
        return itertools.product(*(range(k) for k in self.weight_shape[2:]))

    def _position_gram(self, t: torch.Tensor) -> torch.Tensor:
        """(N, G·C, *S) → (B·G, F·P, F·P): inner products of a sample's positions (its frames'
        positions together), per group."""
        channels = t.shape[1]
        g, outer, inner = self.groups, self.sample.outer, self.sample.inner
        by_group = t.reshape(outer, self.batch, inner, g, channels // g, -1)
        by_position = by_group.permute(1, 3, 0, 2, 5, 4).reshape(self.batch * g, -1, channels // g)
        return torch.bmm(by_position, by_position.transpose(1, 2))

    @property
    def unfolds_windows(self) -> bool:
        """Materialize from the unfolded windows and a batched GEMM rather than the grouped
        backward-weight kernel: when a window (C_in/g · kernel) is no wider than the output
        channels per group, the unfolded input is no larger than the output gradient, which the
        grouped call needs copied into a samples-as-channels layout anyway, and oneDNN's grouped
        kernel is slow on a few channels per group. Measured on CPU, CIFAR-10 CNN at B=256, first
        layer (3→32 channels, 3×3, 32×32): a 33.5 MB transposing copy (18 ms) and the grouped call
        (13 ms) against 10–12 ms unfolded; the step 103 → 91 ms. The MNIST CNN's first layer
        (1→16, 8×8: windows of 64) stays grouped: unfolded it was 1.2 ms slower."""
        t, g, r, c = self.dims
        return not self.transposed and c <= r

    @property
    def defers_clipped_sum(self) -> bool:
        """Hold (input, output gradient) rather than the per-sample gradients until the clip
        factors exist (see ``CONV_DEFER_RATIO``)."""
        held = self.x.numel() + self.grad.numel()
        return self.batch * math.prod(self.shape) > CONV_DEFER_RATIO * held

    def materialize(self) -> torch.Tensor:
        chunks = self.materialize_chunks()
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    def materialize_chunks(self) -> list[torch.Tensor]:
        """The per-sample gradients as consecutive sample blocks ``(b_k, *shape)``, one grouped
        backward-weight call each (see ``CONV_SAMPLES_PER_CALL_CPU``), or all of them from one
        call that unfolds windows a block at a time (:attr:`windows_in_one_call`)."""
        b = self.batch
        if self.windows_in_one_call:
            per_sample = self._window_call()[:, :math.prod(self.weight_shape)]
            return [per_sample.view(b, *self.shape)]
        return [self._materialize(lo, hi) for lo, hi in self._call_blocks()]

    def _call_blocks(self) -> list[tuple[int, int]]:
        """The sample ranges of the grouped backward-weight calls."""
        b, per_call = self.batch, self.batch
        if self.x.device.type == "cpu" and b * math.prod(self.shape) * self.x.element_size() > CONV_ONE_CALL_BYTES_CPU:
            per_call = CONV_SAMPLES_PER_CALL_CPU
        return [(lo, min(b, lo + per_call)) for lo in range(0, b, per_call)]

    def _window_call(self) -> torch.Tensor:
        """``dpcompile::conv_window_grads`` over the whole batch: ``(B, weight numel [+ C_out])``.
        The weight's and the bias's forms make the same call, merged into one by
        :func:`passes.simplify.merge_duplicates`."""
        return torch.ops.dpcompile.conv_window_grads(
            self.x, self.grad, list(self.weight_shape), list(self.stride), list(self.padding),
            list(self.dilation), self.groups, self.sample.outer, self.sample.inner,
            self.window_block_samples, self.with_bias)

    @property
    def shares_bias_call(self) -> bool:
        """The per-sample bias gradients are a by-product of the calls that materialize the
        per-sample weight gradients (a row of ones among each block's windows, or the bias output
        of each grouped backward-weight call): when those calls are made anyway. That saves a
        second pass over the output gradient, which Inductor on CPU makes for a per-sample sum over
        positions, recomputing the gradient's producer."""
        return not self.prefers_ghost() and (self.windows_in_one_call or not self.unfolds_windows)

    def per_sample_bias(self) -> torch.Tensor:
        """``(B, C_out)``: each sample's output gradient summed over positions and frames, from
        the calls that materialize the weight's (requires :attr:`with_bias`)."""
        assert self.with_bias
        if self.windows_in_one_call:
            return self._window_call()[:, math.prod(self.weight_shape):]
        blocks = [self._grouped_call(lo, hi)[2].view(hi - lo, -1) for lo, hi in self._call_blocks()]
        return blocks[0] if len(blocks) == 1 else torch.cat(blocks)

    @property
    def windows_in_one_call(self) -> bool:
        """Unfolded windows made inside one ``dpcompile::conv_window_grads`` call, a block of
        :attr:`window_block_samples` at a time: on CPU, outside exported graphs. Elsewhere they
        are graph ops (one batched GEMM off CPU)."""
        return self.unfolds_windows and self.x.device.type == "cpu" and not _ATEN_ONLY.get()

    @property
    def window_block_samples(self) -> int:
        """About ``CONV_WINDOW_BLOCK_BYTES_CPU`` of windows."""
        t, g, _, c = self.dims
        per_sample = t * g * c * self.x.element_size()
        return max(1, min(self.batch, CONV_WINDOW_BLOCK_BYTES_CPU // per_sample))

    def _materialize(self, lo: int, hi: int) -> torch.Tensor:
        """Samples ``lo:hi`` through the backward-weight kernel with the samples as groups, or
        through unfolded windows (:attr:`unfolds_windows`)."""
        if self.unfolds_windows:
            return self.samples(lo, hi).as_outer().materialize()
        return self._grouped_call(lo, hi)[1].reshape(hi - lo, *self.shape)

    def _grouped_call(self, lo: int, hi: int) -> tuple[Any, ...]:
        """The backward-weight kernel over samples ``lo:hi`` with the samples as groups (and
        their bias gradients with :attr:`with_bias`). The weight's and the bias's forms make the
        same calls, merged into one each by :func:`passes.simplify.merge_duplicates`."""
        n = hi - lo
        outer, inner = self.sample.outer, self.sample.inner

        def samples_as_channels(t: torch.Tensor) -> torch.Tensor:
            if outer == 1 and inner == 1:  # sample-major already: a view, no permute to copy
                return t[lo:hi].reshape(1, n * t.shape[1], *t.shape[2:])
            return self._frames(t, lo, hi).transpose(1, 2).reshape(outer * inner, n * t.shape[1], *t.shape[2:])

        weight = self.x.new_empty(n * self.weight_shape[0], *self.weight_shape[1:])
        out_channels = self.weight_shape[1] * self.groups if self.transposed else self.weight_shape[0]
        return tuple(torch.ops.aten.convolution_backward(
            samples_as_channels(self.grad), samples_as_channels(self.x), weight,
            [n * out_channels] if self.with_bias else None,
            list(self.stride), list(self.padding), list(self.dilation), self.transposed,
            list(self.output_padding), n * self.groups, [False, True, self.with_bias],
        ))

    def _frames(self, t: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """The frames of samples lo:hi of ``t``, ``(outer, hi - lo, inner, ...)``: a view."""
        return t.unflatten(0, (self.sample.outer, self.batch, self.sample.inner))[:, lo:hi]

    def samples(self, lo: int, hi: int) -> Convolution:
        """The same form over samples ``lo:hi`` only (their frames, as views)."""
        return dataclasses.replace(self, x=self._frames(self.x, lo, hi).flatten(0, 2),
                                   grad=self._frames(self.grad, lo, hi).flatten(0, 2), batch_size=hi - lo)

    def as_outer(self, im2col: bool = True) -> Outer:
        from passes.per_sample_rules import conv_outer

        return conv_outer(self, im2col)


@torch.library.custom_op("dpcompile::conv_window_grads", mutates_args=())
def conv_window_grads(x: torch.Tensor, grad: torch.Tensor, weight_shape: list[int], stride: list[int],
                      padding: list[int], dilation: list[int], groups: int, outer: int, inner: int,
                      samples_per_block: int, with_bias: bool = False) -> torch.Tensor:
    """Per-sample weight gradients ``(B, prod(weight_shape))`` of a (not transposed) convolution
    from its unfolded input windows and a batched GEMM, ``samples_per_block`` samples at a time:
    only one block's windows exist at once. ``with_bias``: followed by the per-sample bias
    gradients ``(B, C_out)``, from a row of ones added to each block's windows."""
    from passes.per_sample_rules import by_position, window_view

    batch = x.shape[0] // (outer * inner)
    spatial = len(weight_shape) - 2
    form = Convolution(x, grad, tuple(weight_shape), tuple(stride), tuple(padding), tuple(dilation), False,
                       (0,) * spatial, groups, SampleDim(0, outer, inner), batch, tuple(weight_shape))
    _, _, r, c = form.dims
    # windows: a strided view of the padded input; each block's are one copy of it (eagerly much
    # faster than the native im2col, see unfold_nd)
    windows = window_view(x, tuple(weight_shape[2:]), tuple(stride), tuple(padding), tuple(dilation))
    positions = grad.flatten(2)
    width = c + 1 if with_bias else c  # the windows' columns, and a column of ones for the bias
    out = x.new_empty(batch, groups * r * width)
    per_sample = out[:, :groups * r * c].view(batch, groups, r, c)
    bias = out[:, groups * r * c:].view(batch, groups, r) if with_bias else None
    frames = SampleDim(0, outer, inner)
    for lo in range(0, batch, samples_per_block):
        hi = min(batch, lo + samples_per_block)
        rows = _groups_first(by_position(form._frames(positions, lo, hi).flatten(0, 2), groups, frames, hi - lo))
        # (C × T)·(T × R): both factors row-major here (windows copied channel-major, the output
        # gradient channels-last), twice as fast on CPU as (R × T)·(T × C) for this layer shape
        # (18 samples of 3→32 channels, 32×32: 0.25 against 0.52 ms)
        if groups == 1 and outer == inner == 1:  # the windows copied once, into the GEMM's factor
            channel_major = x.new_empty(hi - lo, width, positions.shape[-1])
            channel_major[:, :c].view(windows[lo:hi].shape).copy_(windows[lo:hi])
        else:
            block_windows = form._frames(windows, lo, hi).reshape(-1, x.shape[1] * math.prod(weight_shape[2:]),
                                                                  positions.shape[-1])
            cols = _groups_first(by_position(block_windows, groups, frames, hi - lo))  # (b·G, T, C)
            channel_major = x.new_empty(cols.shape[0], width, cols.shape[1])
            channel_major[:, :c].copy_(cols.transpose(1, 2))
        if with_bias:
            channel_major[:, c].fill_(1)
        products = torch.bmm(channel_major, rows)  # (b·G, C [+ 1], R)
        per_sample[lo:hi].copy_(products[:, :c].transpose(1, 2).view(hi - lo, groups, r, c))
        if bias is not None:
            bias[lo:hi].copy_(products[:, c].view(hi - lo, groups, r))
    return out


@conv_window_grads.register_fake
def _(x, grad, weight_shape, stride, padding, dilation, groups, outer, inner, samples_per_block, with_bias=False):
    bias = weight_shape[0] if with_bias else 0
    return x.new_empty(x.shape[0] // (outer * inner), math.prod(weight_shape) + bias)


def _both_positions(block: tuple[slice, ...]) -> tuple[slice, ...]:
    """An index of a position-Gram view ``(B·G, F, *S, F, *S)`` taking ``block`` of the spatial
    positions on both sides."""
    return (slice(None),) * 2 + block + (slice(None),) + block


def _groups_first(factor: torch.Tensor) -> torch.Tensor:
    """(B, T, G, X) → (B·G, T, X); a view when the storage is group-major (e.g. conv layouts)."""
    batch, steps, groups, width = factor.shape
    if groups == 1:
        return factor.squeeze(2)
    return factor.permute(0, 2, 1, 3).reshape(batch * groups, steps, width)


@dataclass
class Lookup(GradForm):
    index: torch.Tensor  # (B, T) integer rows
    cols: torch.Tensor  # (B, T, C)
    num_rows: int
    shape: tuple[int, ...]  # layout (num_rows, C)

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    def view(self, shape: tuple[int, ...]) -> GradForm:
        return Lookup(self.index, self.cols, self.num_rows, tuple(shape))

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError("embedding gradients are never materialized per sample")

    def sq_norm(self) -> torch.Tensor:
        batch, t = self.index.shape
        if t <= LOOKUP_GHOST_MAX_POSITIONS:
            same = (self.index[:, :, None] == self.index[:, None, :]).to(self.cols.dtype)
            gram = torch.einsum("btc,bsc->bts", self.cols, self.cols)
            return (same * gram).sum((1, 2))
        return _segment_sq_norms(self.index, self.cols, self.num_rows)

    def inner_dense(self, dense: torch.Tensor) -> torch.Tensor:
        """⟨this, dense⟩ per sample for a dense (B, *shape) gradient."""
        c = self.cols.shape[-1]
        table = dense.reshape(self.batch, self.num_rows, c)
        picked = table.gather(1, self.index[:, :, None].expand(-1, -1, c))
        return (picked * self.cols).sum((1, 2))

    def inner_outer(self, outer: Outer) -> torch.Tensor:
        """⟨this, outer⟩ per sample; ``outer`` must have one group and the same layout."""
        rows = outer.rows[:, :, 0, :]  # (B, T1, V)
        cols = outer.cols[:, :, 0, :]  # (B, T1, C)
        t1 = rows.shape[1]
        picked = rows.gather(2, self.index[:, None, :].expand(-1, t1, -1))  # (B, T1, T2)
        gram = torch.einsum("btc,bsc->bts", cols, self.cols)
        return (picked * gram).sum((1, 2))


def _segment_sq_norms(index: torch.Tensor, cols: torch.Tensor, num_rows: int) -> torch.Tensor:
    """Σ over distinct (sample, row) of ‖Σ_{t: index=row} cols_t‖², without a (B, V, C) tensor.

    Sort the keys ``b·V + row``; equal keys form runs; sum each run with index_add, square, and add
    each run's square to its sample. Shapes stay static (at most B·T runs).
    """
    batch, t = index.shape
    c = cols.shape[-1]
    n = batch * t
    sample = torch.arange(batch, device=index.device).repeat_interleave(t)
    keys = sample * num_rows + index.reshape(-1).long()
    sorted_keys, order = torch.sort(keys)
    starts = torch.ones_like(sorted_keys, dtype=torch.bool)
    starts[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run = torch.cumsum(starts.long(), 0) - 1
    run_sums = torch.zeros(n, c, dtype=cols.dtype, device=cols.device)
    run_sums = run_sums.index_add(0, run, cols.reshape(n, c)[order])
    run_sample = torch.zeros(n, dtype=torch.long, device=index.device)
    run_sample = run_sample.scatter(0, run, sorted_keys // num_rows)
    out = torch.zeros(batch, dtype=cols.dtype, device=cols.device)
    return out.index_add(0, run_sample, run_sums.pow(2).sum(1))


@dataclass
class Scattered(GradForm):
    """Entry ``(index[b,t,c], c)`` of sample ``b``'s gradient receives ``values[b,t,c]``."""

    index: torch.Tensor  # (B, T, C)
    values: torch.Tensor  # (B, T, C)
    num_rows: int
    shape: tuple[int, ...]

    @property
    def batch(self) -> int:
        return int(self.index.shape[0])

    def view(self, shape: tuple[int, ...]) -> GradForm:
        return Scattered(self.index, self.values, self.num_rows, tuple(shape))

    def materialize(self) -> torch.Tensor:
        raise NotImplementedError("embedding gradients are never materialized per sample")

    def sq_norm(self) -> torch.Tensor:
        same = (self.index[:, :, None, :] == self.index[:, None, :, :]).to(self.values.dtype)
        return (same * self.values[:, :, None, :] * self.values[:, None, :, :]).sum((1, 2, 3))


def fallback_rule(source_rules: list[str], op: object) -> str:
    """The rule label of a form made by running ``op`` per sample (vmap) on forms with
    ``source_rules``: ``"<source rules>>vmap:<op>,<op>..."``, e.g. ``"bmm>vmap:aten.permute.default"``."""
    roots: list[str] = []
    ops: list[str] = []
    for rule in source_rules:
        root, _, rest = rule.partition("vmap:")
        roots.append(root.removesuffix(">"))
        ops += rest.split(",") if rest else []
    ops.append(str(op))
    return "+".join(dict.fromkeys(r for r in roots if r)) + ">vmap:" + ",".join(dict.fromkeys(ops))


@dataclass
class NormPlan:
    """How one parameter's per-sample norm is computed (what ``explain`` reports)."""

    strategy: str  # "ghost", "materialized", "embedding", "dense" or a '+'-joined mix
    uses: int
    ghost_flops: int = 0
    materialized_flops: int = 0
    memory_elements: int = 0
    notes: list[str] = field(default_factory=list)
    rules: list[str] = field(default_factory=list)  # the rule of each use (GradForm.rule)
    flops: int = 0  # estimated flops of the chosen norm computation, all uses

    @property
    def materialized(self) -> bool:
        return self.strategy in ("materialized", "dense")

    @property
    def fallback(self) -> bool:
        """Some use had no rule and was evaluated per sample with torch.vmap."""
        return any("vmap:" in r for r in self.rules)


def combine_sq_norms(forms: list[GradForm], param: str) -> tuple[torch.Tensor, NormPlan, list[torch.Tensor] | None]:
    """Per-sample ‖Σ_u G_u‖² over all uses of one parameter, cross terms included.

    Returns (squared norms (B,), the plan, and the dense per-sample gradients — as consecutive
    sample blocks — when the plan materialized all of them: then the clipped sum is a cheap
    weighted sum of those).
    """
    plan = NormPlan(strategy="", uses=len(forms), rules=[f.rule for f in forms])
    if len(forms) == 1 and isinstance(forms[0], Convolution) and not forms[0].prefers_ghost():
        # A convolution's only use: its per-sample gradients, block by block, are the answer.
        conv = forms[0]
        plan.strategy = "materialized"
        plan.ghost_flops = conv.ghost_cost()[0]
        plan.materialized_flops, plan.memory_elements = conv.materialize_cost()
        plan.flops = plan.materialized_flops
        if conv.unfolds_windows:
            in_blocks = f", {conv.window_block_samples} samples at a time" if conv.windows_in_one_call else ""
            plan.notes.append(f"per-sample gradients from unfolded input windows (batched GEMM{in_blocks})")
        blocks = conv.materialize_chunks()
        sq = torch.cat([Dense(block).sq_norm() for block in blocks])
        if conv.defers_clipped_sum:
            plan.notes.append("clipped sum from a backward-weight call on the clip-scaled output "
                              "gradient (per-sample gradients not held)")
            return sq, plan, None
        return sq, plan, blocks
    if len(forms) == 1 and isinstance(forms[0], Convolution) and forms[0].uses_position_grams:
        conv = forms[0]
        plan.strategy = "ghost"
        plan.ghost_flops, plan.memory_elements = conv.ghost_cost()
        plan.materialized_flops = conv.materialize_cost()[0]
        plan.flops = plan.ghost_flops
        plan.notes.append("ghost norm from Grams of input positions (no unfolded windows)")
        return conv.position_gram_sq_norm(), plan, None
    # Otherwise convolutions take part as outer products (ghost norms, cross terms between uses).
    forms = [f.as_outer() if isinstance(f, Convolution) else f for f in forms]
    outers = [f for f in forms if isinstance(f, Outer)]
    lookups = [f for f in forms if isinstance(f, Lookup)]
    scattered = [f for f in forms if isinstance(f, Scattered)]
    dense = [f.values for f in forms if isinstance(f, Dense)]
    plan.notes += [f.note for f in forms if isinstance(f, Dense) and f.note]
    parts: list[str] = []

    outer: Outer | None = None
    if outers:
        outer = outers[0]
        for other in outers[1:]:
            if outer.compatible(other):
                outer = Outer(
                    torch.cat([outer.rows, other.rows], 1),
                    torch.cat([outer.cols, other.cols], 1),
                    outer.shape,
                )
            else:
                dense.append(other.materialize().reshape(outer.batch, *outer.shape))
        plan.ghost_flops, ghost_mem = outer.ghost_cost()
        plan.materialized_flops, mat_mem = outer.materialize_cost()
        if outer.prefers_ghost():
            parts.append("ghost")
            plan.memory_elements += ghost_mem
            plan.flops += plan.ghost_flops
        else:
            dense.append(outer.materialize().reshape(outer.batch, *outer.shape))
            parts.append("materialized")
            plan.memory_elements += mat_mem
            plan.flops += plan.materialized_flops
            outer = None

    lookup: Lookup | None = None
    if lookups:
        joined = lookups[0]
        for more in lookups[1:]:
            joined = Lookup(
                torch.cat([joined.index, more.index], 1),
                torch.cat([joined.cols, more.cols], 1),
                joined.num_rows,
                joined.shape,
            )
        lookup = joined
        parts.append("embedding")
    if scattered:
        if len(forms) > 1:
            raise NotImplementedError(
                f"parameter `{param}` is a max-mode EmbeddingBag table that is also used "
                "elsewhere; per-sample norms for this combination are not supported (use "
                "mode='sum' or 'mean', or untie the weights)"
            )
        parts.append("embedding")

    _add_cost_estimates(plan, lookup, scattered, dense, from_outer="materialized" in parts)

    total_dense: torch.Tensor | None = None
    if dense:
        total_dense = dense[0]
        for d in dense[1:]:
            total_dense = total_dense + d.reshape(total_dense.shape)
        if not parts or parts[-1] != "materialized":
            parts.append("dense")

    terms: list[torch.Tensor] = []
    if outer is not None:
        terms.append(outer.sq_norm())
    if lookup is not None:
        terms.append(lookup.sq_norm())
    for s in scattered:
        terms.append(s.sq_norm())
    if total_dense is not None:
        terms.append(Dense(total_dense).sq_norm())
    if outer is not None and lookup is not None:
        if outer.dims[1] != 1:
            raise NotImplementedError(f"parameter `{param}`: grouped use shared with a lookup")
        terms.append(2 * lookup.inner_outer(outer))
    if outer is not None and total_dense is not None:
        per_sample = outer.materialize().reshape(total_dense.shape)
        terms.append(2 * (per_sample * total_dense).reshape(total_dense.shape[0], -1).sum(1))
        plan.notes.append("cross term with a dense use materializes the ghost use")
    if lookup is not None and total_dense is not None:
        terms.append(2 * lookup.inner_dense(total_dense))

    sq = terms[0]
    for term in terms[1:]:
        sq = sq + term
    plan.strategy = "+".join(dict.fromkeys(parts))
    only_dense = outer is None and lookup is None and not scattered
    return sq, plan, [total_dense] if only_dense and total_dense is not None else None


def _add_cost_estimates(plan: NormPlan, lookup: Lookup | None, scattered: list[Scattered],
                        dense: list[torch.Tensor], from_outer: bool) -> None:
    """Rough flops and memory of the embedding and dense norms (for explain; decides nothing)."""
    if lookup is not None:
        batch, t = lookup.index.shape
        c = int(lookup.cols.shape[-1])
        if t <= LOOKUP_GHOST_MAX_POSITIONS:
            plan.flops += batch * t * t * c
            plan.memory_elements += batch * t * t
        else:
            plan.flops += batch * t * (c + max(1, int(math.log2(batch * t))))
            plan.memory_elements += batch * t * c
    for s in scattered:
        batch, t, c = (int(d) for d in s.index.shape)
        plan.flops += batch * t * t * c
        plan.memory_elements += batch * t * t * c
    for k, d in enumerate(dense):
        if k == len(dense) - 1 and from_outer:
            continue  # the materialized outer products, counted above
        plan.flops += d.numel()
        plan.memory_elements += d.numel()
