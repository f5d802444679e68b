"""RNNs as one recurrence op per layer and direction, so compile time does not grow with length.

Unrolling an LSTM over T steps puts ~90·T nodes in the graph (11k at T=128, four minutes of
Inductor time on two cores). Instead, capture routes ``torch._VF.lstm / gru / rnn_tanh / rnn_relu``
(what nn.LSTM, nn.GRU and nn.RNN call) through :func:`run_rnn`:

- the input projection of every step is one matmul, ``gates_x = x W_ihᵀ + b_ih`` over (B·T) rows;
- the recurrence is one custom op, ``dpcompile::rnn_scan``, which loops over time inside: one
  GEMM and one cell (the step's pointwise math) per step; under Inductor the cell is compiled
  into one kernel (``passes.kernels.with_fused_cells``), eagerly it is ~10 small kernels;
- its backward, ``dpcompile::rnn_scan_backward``, returns the per-step gate gradients, and the
  recurrent weight gradients are ordinary graph ops on them: ``dW_hh = Σ_t dgates_h[t] ⊗ h[t-1]``
  as one matmul over (B·T) rows, ``db_hh`` as a sum.

Every parameter gradient therefore stays a standard reducing node (per-sample rules apply, with
the cross terms between time steps), while the graph has a constant number of nodes. The
recurrence ops are per sample by construction (rows never interact); their sample-dim rule is
registered in passes/sample_dims.py. LSTMs with ``proj_size`` and PackedSequence inputs keep
the unrolled form.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ---- one time step of each recurrence, as pure tensor math ------------------------------
#
# Each cell reads the step's inputs and writes its results into the caller's (T, B, ·) buffers
# through ``copy_``; it returns what the next step reads, as fresh tensors, so that no two
# arguments of a call share storage. Eagerly a cell is ~10 small kernels; compiled
# (``fused=True``) it is one, which is most of a scan's time on CPU (B=256, H=100, T=64: 39 ms
# eager against 16 ms compiled for an LSTM forward, of which the GEMMs are 8 ms).


def _lstm_cell(gx: torch.Tensor, rec: torch.Tensor, b_hh: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
               gates: torch.Tensor, cells: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # All four gates as one sigmoid over (B, 4, H), with tanh(x) = 2·sigmoid(2x) - 1 for the cell
    # gate: one elementwise pass writes the saved gates in place, where chunk + cat made the
    # compiled kernel fill a temporary and copy it (B=256, H=100, T=64: 7.9 -> 6.5 ms of cells).
    z = (gx + rec + b_hh).unflatten(1, (4, -1))
    doubled = 1 + (torch.arange(4, device=z.device) == 2).to(z.dtype).unsqueeze(1)  # 1, 1, 2, 1
    activated = torch.sigmoid(z * doubled) * doubled - (doubled - 1)
    gates.copy_(activated.flatten(1))
    i, f, g, o = activated.unbind(1)
    c_new = f * c + i * g
    h_new = o * c_new.tanh()
    cells.copy_(c_new)
    out.copy_(h_new)
    return h_new, c_new


def _gru_cell(gx: torch.Tensor, rec: torch.Tensor, b_hh: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
              gates: torch.Tensor, cells: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # GRU's b_hh sits inside r·(W_hn h + b_hn), so it joins the recurrent term, not the input one.
    hidden = h.shape[1]
    gh = rec + b_hh
    rz = (gx[:, : 2 * hidden] + gh[:, : 2 * hidden]).sigmoid()
    r, z = rz[:, :hidden], rz[:, hidden:]
    hn = gh[:, 2 * hidden :]
    n = (gx[:, 2 * hidden :] + r * hn).tanh()
    h_new = n + z * (h - n)
    gates.copy_(torch.cat([rz, n], 1))
    cells.copy_(hn)
    out.copy_(h_new)
    return h_new, c


def _plain_cell(activation: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., Any]:
    """nn.RNN's step: h' = activation(x W_ihᵀ + b_ih + h W_hhᵀ + b_hh)."""

    def cell(gx: torch.Tensor, rec: torch.Tensor, b_hh: torch.Tensor, h: torch.Tensor, c: torch.Tensor,
             gates: torch.Tensor, cells: torch.Tensor, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h_new = activation(gx + rec + b_hh)
        gates.copy_(h_new)
        out.copy_(h_new)
        return h_new, c

    return cell


def _lstm_cell_backward(d_out: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor, gates: torch.Tensor,
                        cells: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor, d_gx: torch.Tensor,
                        d_gh: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Writes the step's gate gradients; returns (the part of dh_prev not through W_hh, dc_prev)."""
    i, f, g, o = gates.chunk(4, 1)
    dh = dh + d_out
    tanh_c = cells.tanh()
    dc = dc + dh * o * (1 - tanh_c * tanh_c)
    d_gx.copy_(torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                          dh * tanh_c * o * (1 - o)], 1))
    return None, dc * f


def _gru_cell_backward(d_out: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor, gates: torch.Tensor,
                       cells: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor, d_gx: torch.Tensor,
                       d_gh: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    assert d_gh is not None
    r, z, n = gates.chunk(3, 1)
    dh = dh + d_out
    dn = dh * (1 - z) * (1 - n * n)
    dz = dh * (h_prev - n) * z * (1 - z)
    dr = dn * cells * r * (1 - r)
    d_gx.copy_(torch.cat([dr, dz, dn], 1))
    d_gh.copy_(torch.cat([dr, dz, dn * r], 1))
    return dh * z, dc


def _rnn_tanh_cell_backward(d_out: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor, gates: torch.Tensor,
                            cells: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor, d_gx: torch.Tensor,
                            d_gh: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    d_gx.copy_((dh + d_out) * (1 - gates * gates))
    return None, dc


def _rnn_relu_cell_backward(d_out: torch.Tensor, dh: torch.Tensor, dc: torch.Tensor, gates: torch.Tensor,
                            cells: torch.Tensor, h_prev: torch.Tensor, c_prev: torch.Tensor, d_gx: torch.Tensor,
                            d_gh: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor]:
    d_gx.copy_(torch.where(gates > 0, dh + d_out, 0))
    return None, dc


CELLS: dict[str, tuple[Callable[..., Any], Callable[..., Any]]] = {
    "lstm": (_lstm_cell, _lstm_cell_backward),
    "gru": (_gru_cell, _gru_cell_backward),
    "rnn_tanh": (_plain_cell(torch.tanh), _rnn_tanh_cell_backward),
    "rnn_relu": (_plain_cell(torch.relu), _rnn_relu_cell_backward),
}


class _CompiledCell:
    """One cell compiled by Inductor for one configuration, called without Dynamo.

    A scan calls its cell once per step, so per-call overhead counts: through ``torch.compile``
    each call paid Dynamo's cache lookup and guards and AOTAutograd's runtime wrapper, ~45 µs of
    a ~160 µs call (LSTM, B=256, H=100, 2 CPU cores). The cell is traced once with fake tensors
    and handed to ``compile_fx``: the same kernel, called directly. Every step's arguments share
    the first call's shapes and strides (slices of the scan's buffers, states the scans make
    contiguous), so nothing needs guarding.
    """

    def __init__(self, cell: Callable[..., Any]) -> None:
        self.cell = cell
        self.compiled: Callable[..., Any] | None = None
        self.none_outputs: tuple[bool, ...] = ()

    def __call__(self, *args: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        tensors = [a for a in args if a is not None]
        if self.compiled is None:
            self.compiled = self._compile(args, tensors)
        results = iter(self.compiled(*tensors))
        return tuple(None if absent else next(results) for absent in self.none_outputs)

    def _compile(self, args: tuple[torch.Tensor | None, ...], tensors: list[torch.Tensor]) -> Callable[..., Any]:
        from torch._inductor import config as inductor_config

        from passes.lower import compile_function  # lower -> kernels -> this module

        present = [i for i, a in enumerate(args) if a is not None]

        def tensors_only(*tensors: torch.Tensor) -> list[torch.Tensor]:
            full: list[torch.Tensor | None] = [None] * len(args)
            for i, t in zip(present, tensors):
                full[i] = t
            results = self.cell(*full)
            self.none_outputs = tuple(r is None for r in results)
            return [r for r in results if r is not None]

        # Sleef's vectorized tanh is ~8x slower on CPU than 2/(1+exp(-2x))-1 (102k floats, one
        # core: 290 against 45 µs); the decomposed form's error is absolute, ~1 ulp of 1, which
        # the cell's other float rounding matches. Every cell but the ReLU RNN's takes a tanh.
        patches = {"cpp.use_decompose_tanh": True} if hasattr(inductor_config.cpp, "use_decompose_tanh") else {}
        return compile_function(tensors_only, tensors, patches)


@functools.cache
def _compiled(cell: Callable[..., Any], device: torch.device, dtype: torch.dtype, batch: int,
              hidden: int) -> _CompiledCell:
    return _CompiledCell(cell)


def _cell(mode: str, backward: bool, fused: bool, h0: torch.Tensor) -> Callable[..., Any]:
    cell = CELLS[mode][1 if backward else 0]
    return _compiled(cell, h0.device, h0.dtype, *h0.shape) if fused else cell


# ---- the recurrence, inside the custom ops ----------------------------------------------


def _scan_forward(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                  b_hh: torch.Tensor, mode: str, fused: bool) -> tuple[torch.Tensor, ...]:
    """The recurrence over time-major (T, B, G·H) input gates: one GEMM and one cell per step."""
    cell = _cell(mode, False, fused, h0)
    steps = gates_x.shape[0]
    gx = gates_x.contiguous()
    gates = torch.empty_like(gx)  # activated gates, saved for backward
    out = gx.new_empty(steps, gx.shape[1], h0.shape[-1])
    cells = torch.empty_like(out)  # LSTM: c_t; GRU: W_hn h + b_hn; unused otherwise
    w_t = w_hh.t()
    # Contiguous states: a compiled cell keeps the strides of its first call (see _CompiledCell).
    h, c, b_hh = h0.contiguous(), c0.contiguous(), b_hh.contiguous()
    # Per-step views made in one call each: indexing four buffers per step costs ~1 ms a scan.
    for gx_t, gates_t, cells_t, out_t in zip(gx.unbind(0), gates.unbind(0), cells.unbind(0), out.unbind(0)):
        h, c = cell(gx_t, torch.mm(h, w_t), b_hh, h, c, gates_t, cells_t, out_t)
    c_last = c.clone() if mode == "lstm" else torch.zeros_like(h0)
    return out, h.clone(), c_last, gates, cells


def _scan_backward(d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor, gates: torch.Tensor,
                   cells: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, out: torch.Tensor,
                   w_hh: torch.Tensor, mode: str, fused: bool) -> tuple[torch.Tensor, ...]:
    """Backpropagation through time over time-major tensors."""
    cell = _cell(mode, True, fused, h0)
    steps = out.shape[0]
    d_out = d_out.contiguous()
    d_gates_x = torch.empty_like(gates)
    # Only GRU's recurrent gate gradients differ from the input ones.
    d_gates_h = torch.empty_like(gates) if mode == "gru" else None
    dh, dc = d_h.contiguous(), d_c.contiguous()
    recurrent = d_gates_x if d_gates_h is None else d_gates_h  # what flows back through W_hh
    d_out_t, gates_t, cells_t, out_t = d_out.unbind(0), gates.unbind(0), cells.unbind(0), out.unbind(0)
    d_gx_t, recurrent_t = d_gates_x.unbind(0), recurrent.unbind(0)
    h0, c0 = h0.contiguous(), c0.contiguous()
    for t in range(steps - 1, -1, -1):
        h_prev, c_prev = (out_t[t - 1], cells_t[t - 1]) if t > 0 else (h0, c0)
        d_gh = None if d_gates_h is None else recurrent_t[t]
        direct, dc = cell(d_out_t[t], dh, dc, gates_t[t], cells_t[t], h_prev, c_prev, d_gx_t[t], d_gh)
        dh = torch.mm(recurrent_t[t], w_hh) if direct is None else torch.addmm(direct, recurrent_t[t], w_hh)
    if d_gates_h is None:
        d_gates_h = d_gates_x.new_empty(0)
    # Outputs of a custom op must not alias its inputs (T = 0, or a state that passes through).
    dc = dc if mode == "lstm" and steps > 0 else d_c.clone()
    return d_gates_x, d_gates_h, dh if steps > 0 else d_h.clone(), dc


@torch.library.custom_op("dpcompile::rnn_scan", mutates_args=())
def rnn_scan(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
             b_hh: torch.Tensor, mode: str, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RNN layer in one direction over time-major (T, B, G·H) precomputed input gates;
    returns (out (T, B, H), h_T, c_T, activated gates, cells) — the last two saved for backward.
    ``fused`` runs each step's pointwise math as one compiled kernel (see ``passes.kernels.with_fused_cells``)."""
    out, h_last, c_last, gates, cells = _scan_forward(gates_x, h0, c0, w_hh, b_hh, mode, fused)
    return out, h_last, c_last, gates, cells


@rnn_scan.register_fake
def _(gates_x, h0, c0, w_hh, b_hh, mode, fused):
    steps, batch, _ = gates_x.shape
    hidden = h0.shape[-1]
    out = gates_x.new_empty(steps, batch, hidden)
    return out, h0.new_empty(h0.shape), c0.new_empty(h0.shape), torch.empty_like(gates_x), gates_x.new_empty(steps, batch, hidden)


@torch.library.custom_op("dpcompile::rnn_scan_backward", mutates_args=())
def rnn_scan_backward(d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor, gates: torch.Tensor,
                      cells: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, out: torch.Tensor,
                      w_hh: torch.Tensor, mode: str, fused: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagation through time: (d gates_x, d gates_h (B, T, G·H), d h0, d c0); d gates_h is
    empty unless mode is "gru" (elsewhere it equals d gates_x)."""
    d_gates_x, d_gates_h, d_h0, d_c0 = _scan_backward(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, mode, fused)
    return d_gates_x, d_gates_h, d_h0, d_c0


@rnn_scan_backward.register_fake
def _(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, mode, fused):
    d_gates_h = torch.empty_like(gates) if mode == "gru" else gates.new_empty(0)
    return torch.empty_like(gates), d_gates_h, torch.empty_like(h0), torch.empty_like(h0)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    gates_x, h0, c0, w_hh, b_hh, mode, fused = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(gates, cells, h0, c0, out, w_hh)
    ctx.mode = mode
    ctx.fused = fused
    ctx.mark_non_differentiable(gates, cells)


def _backward(ctx: Any, d_out: torch.Tensor | None, d_h: torch.Tensor | None, d_c: torch.Tensor | None,
              _d_gates: Any, _d_cells: Any) -> tuple[Any, ...]:
    gates, cells, h0, c0, out, w_hh = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_h = torch.zeros_like(h0) if d_h is None else d_h
    d_c = torch.zeros_like(h0) if d_c is None else d_c
    d_gx, d_gh, d_h0, d_c0 = rnn_scan_backward(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, ctx.mode, ctx.fused)
    if ctx.mode != "gru":
        d_gh = d_gx  # the recurrent gates are the input gates
    hidden = h0.shape[-1]
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)  # (T, B, H)
    # Recurrent weight gradients as plain graph ops: one reducing matmul over (B·T) rows.
    d_w_hh = d_gh.reshape(-1, d_gh.shape[-1]).t().mm(h_prev.reshape(-1, hidden))
    d_b_hh = d_gh.sum((0, 1))
    return d_gx, d_h0, d_c0, d_w_hh, d_b_hh, None, None


rnn_scan.register_autograd(_backward, setup_context=_setup_context)


# ---- nn.LSTM / nn.GRU / nn.RNN semantics on top of the scan -----------------------------


def run_rnn(mode: str, x: torch.Tensor, hx: Any, weights: Sequence[torch.Tensor], has_biases: bool,
            num_layers: int, dropout: float, train: bool, bidirectional: bool,
            batch_first: bool) -> tuple[torch.Tensor, ...]:
    """What ``torch._VF.<mode>`` computes, with one scan op per layer and direction."""
    directions = 2 if bidirectional else 1
    per_layer = 4 if has_biases else 2
    seq = x.transpose(0, 1) if batch_first else x  # time-major (T, B, d) between layers
    if mode == "lstm":
        h0_all, c0_all = hx
    else:
        h0_all, c0_all = hx, None
    hidden = h0_all.shape[-1]
    h_n, c_n = [], []
    layer_input = seq
    for layer in range(num_layers):
        outputs = []
        for direction in range(directions):
            k = layer * directions + direction
            w = weights[k * per_layer : (k + 1) * per_layer]
            w_ih, w_hh = w[0], w[1]
            b_ih = w[2] if has_biases else None
            b_hh = w[3] if has_biases else w_hh.new_zeros(w_hh.shape[0])
            source = layer_input.flip(0) if direction == 1 else layer_input
            gates_x = F.linear(source, w_ih, b_ih)
            h0 = h0_all[k]
            c0 = c0_all[k] if c0_all is not None else torch.zeros_like(h0)
            out, h_last, c_last, _, _ = rnn_scan(gates_x, h0, c0, w_hh, b_hh, mode, False)
            outputs.append(out.flip(0) if direction == 1 else out)
            h_n.append(h_last)
            c_n.append(c_last)
        layer_input = torch.cat(outputs, -1) if directions == 2 else outputs[0]
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, True)
    output = layer_input.transpose(0, 1) if batch_first else layer_input
    if hidden != h_n[0].shape[-1]:  # pragma: no cover - shapes are checked by nn.RNNBase
        raise AssertionError("hidden size mismatch")
    if mode == "lstm":
        return output, torch.stack(h_n), torch.stack(c_n)
    return output, torch.stack(h_n)


_VF_FUNCTIONS = {
    "lstm": torch._VF.lstm,  # type: ignore[attr-defined]
    "gru": torch._VF.gru,  # type: ignore[attr-defined]
    "rnn_tanh": torch._VF.rnn_tanh,  # type: ignore[attr-defined]
    "rnn_relu": torch._VF.rnn_relu,  # type: ignore[attr-defined]
}


class _RecurrenceMode(TorchFunctionMode):
    """Routes the ``_VF`` RNN calls of nn.LSTM / nn.GRU / nn.RNN to :func:`run_rnn`."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        for mode, vf in _VF_FUNCTIONS.items():
            if func is vf and _plain_call(mode, args):
                return run_rnn(mode, *args, **kwargs)
        return func(*args, **kwargs)


def _plain_call(mode: str, args: tuple[Any, ...]) -> bool:
    """The (input, hx, weights, ...) overload without projections (not a PackedSequence)."""
    if len(args) != 9 or not isinstance(args[2], (list, tuple)):
        return False
    weights, has_biases, num_layers, bidirectional = args[2], args[3], args[4], args[7]
    per_layer = 4 if has_biases else 2
    return len(weights) == per_layer * num_layers * (2 if bidirectional else 1)


@contextlib.contextmanager
def recurrences_as_scans() -> Iterator[None]:
    """Within this context, RNN modules trace to scan ops instead of unrolled steps."""
    with _RecurrenceMode():
        yield
