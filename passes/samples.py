"""Sample layout helpers: split, scale, take and pad the samples of a tensor by its SampleDim."""

from __future__ import annotations

import torch

from passes.sample_dims import SampleDim


def split_samples(t: torch.Tensor, sd: SampleDim, batch: int) -> torch.Tensor:
    """Move samples to a new leading dimension: (…, o·B·i, …) → (B, …, o·i, …)."""
    d = sd.dim
    shape = tuple(t.shape)
    if d == 0 and sd.outer == 1 and sd.inner == 1:
        return t.unsqueeze(1)  # already sample-major: a view, whatever the strides
    moved = t.unflatten(d, (sd.outer, batch, sd.inner)).movedim(d + 1, 0)
    return moved.reshape(batch, *shape[:d], sd.outer * sd.inner, *shape[d + 1 :])


def rows_per_sample(t: torch.Tensor, sd: SampleDim, batch: int, trailing: int) -> torch.Tensor:
    """(B, T, *last ``trailing`` dims): every position of a sample's slice as one row."""
    per_sample = split_samples(t, sd, batch)
    tail = tuple(per_sample.shape[per_sample.dim() - trailing :]) if trailing else ()
    return per_sample.reshape(batch, -1, *tail)


def scale_samples(t: torch.Tensor, sd: SampleDim, weights: torch.Tensor) -> torch.Tensor:
    """Multiply sample ``b``'s slice of ``t`` by ``weights[b]``."""
    batch = weights.shape[0]
    d = sd.dim
    split = t.unflatten(d, (sd.outer, batch, sd.inner))
    view = [1] * split.dim()
    view[d + 1] = batch
    return (split * weights.to(t.dtype).view(view)).flatten(d, d + 2)


def zero_samples(t: torch.Tensor, sd: SampleDim, keep: torch.Tensor) -> torch.Tensor:
    """``t`` with sample ``b``'s slice set to 0 where ``keep[b]`` is false (``where``: NaN-safe)."""
    batch = keep.shape[0]
    d = sd.dim
    split = t.unflatten(d, (sd.outer, batch, sd.inner))
    view = [1] * split.dim()
    view[d + 1] = batch
    return torch.where(keep.view(view), split, torch.zeros((), dtype=t.dtype, device=t.device)).flatten(d, d + 2)


def take_samples(t: torch.Tensor, sd: SampleDim, batch: int, count: int) -> torch.Tensor:
    """The first ``count`` of ``batch`` samples of ``t`` (dropping padding rows)."""
    if count == batch:
        return t
    d = sd.dim
    split = t.unflatten(d, (sd.outer, batch, sd.inner))
    return split.narrow(d + 1, 0, count).flatten(d, d + 2)


def pad_samples(t: torch.Tensor, sd: SampleDim, count: int, batch: int) -> torch.Tensor:
    """``t`` holds ``count`` samples; return it with ``batch`` samples, the extra ones zero."""
    if count == batch:
        return t
    d = sd.dim
    split = t.unflatten(d, (sd.outer, count, sd.inner))
    shape = list(split.shape)
    shape[d + 1] = batch - count
    zeros = split.new_zeros(shape)
    return torch.cat([split, zeros], d + 1).flatten(d, d + 2)
