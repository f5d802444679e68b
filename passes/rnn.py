"""RNNs as one recurrence op per layer and direction, so compile time does not grow with length.

Unrolling an LSTM over T steps puts ~90·T nodes in the graph (11k at T=128, four minutes of
Inductor time on two cores). Instead, capture routes ``torch._VF.lstm / gru / rnn_tanh / rnn_relu``
(what nn.LSTM, nn.GRU and nn.RNN call) through :func:`run_rnn`:

- the input projection of every step is one matmul, ``gates_x = x W_ihᵀ + b_ih`` over (B·T) rows;
- the recurrence is one custom op, ``dpcompile::rnn_scan``, which loops over time inside;
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
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


# ---- the recurrence, eagerly, inside the custom ops -------------------------------------


def _scan_forward(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
                  b_hh: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """The recurrence over time-major (T, B, G·H) input gates: contiguous per-step slices,
    in-place activations."""
    steps = gates_x.shape[0]
    hidden = h0.shape[-1]
    w_t = w_hh.t()
    # GRU's b_hh sits inside r·(W_hn h + b_hn); the others add it to the input gates.
    gx = gates_x.contiguous() if mode == "gru" else gates_x + b_hh
    gates = torch.empty_like(gx)  # activated gates, saved for backward
    out = gx.new_empty(steps, gx.shape[1], hidden)
    cells = torch.empty_like(out)  # LSTM: c_t; GRU: W_hn h + b_hn
    h, c = h0, c0
    for t in range(steps):
        act = gates[t]
        if mode == "lstm":
            torch.addmm(gx[t], h, w_t, out=act)
            act[:, : 2 * hidden].sigmoid_()
            act[:, 2 * hidden : 3 * hidden].tanh_()
            act[:, 3 * hidden :].sigmoid_()
            i, f, g, o = act.chunk(4, 1)
            c = torch.mul(f, c, out=cells[t]).addcmul_(i, g)
            h = torch.mul(o, c.tanh(), out=out[t])
        elif mode == "gru":
            gh = torch.addmm(b_hh, h, w_t)
            torch.add(gx[t][:, : 2 * hidden], gh[:, : 2 * hidden], out=act[:, : 2 * hidden]).sigmoid_()
            cells[t] = gh[:, 2 * hidden :]
            r, z, n = act.chunk(3, 1)
            torch.addcmul(gx[t][:, 2 * hidden :], r, cells[t], out=n).tanh_()
            h = torch.addcmul(n, z, h - n, out=out[t])
        else:
            torch.addmm(gx[t], h, w_t, out=act)
            act.tanh_() if mode == "rnn_tanh" else act.relu_()
            out[t] = act
            h = out[t]
    c_last = c.clone() if mode == "lstm" else torch.zeros_like(h0)
    return out, h.clone(), c_last, gates, cells


def _scan_backward(d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor, gates: torch.Tensor,
                   cells: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, out: torch.Tensor,
                   w_hh: torch.Tensor, mode: str) -> tuple[torch.Tensor, ...]:
    """Backpropagation through time over time-major tensors."""
    steps = out.shape[0]
    d_out = d_out.contiguous()
    d_gates_x = torch.empty_like(gates)
    d_gates_h = torch.empty_like(gates) if mode == "gru" else d_gates_x
    dh = d_h.clone()
    dc = d_c.clone()
    for t in range(steps - 1, -1, -1):
        dh = dh + d_out[t]
        dx = d_gates_x[t]
        if mode == "lstm":
            i, f, g, o = gates[t].chunk(4, 1)
            c_prev = cells[t - 1] if t > 0 else c0
            tanh_c = cells[t].tanh()
            di, df, dg, do = dx.chunk(4, 1)
            torch.mul(dh, tanh_c, out=do)
            dc = dc + (dh * o).mul_(1 - tanh_c * tanh_c)
            torch.mul(dc, g, out=di)
            torch.mul(dc, c_prev, out=df)
            torch.mul(dc, i, out=dg)
            dx[:, : 2 * dh.shape[1]].mul_(gates[t][:, : 2 * dh.shape[1]] * (1 - gates[t][:, : 2 * dh.shape[1]]))
            dg.mul_(1 - g * g)
            do.mul_(o * (1 - o))
            dc = dc * f
            dh = dx @ w_hh
        elif mode == "gru":
            r, z, n = gates[t].chunk(3, 1)
            h_prev = out[t - 1] if t > 0 else h0
            hn = cells[t]
            dr, dz, dn = dx.chunk(3, 1)
            torch.mul(dh * (1 - z), 1 - n * n, out=dn)
            torch.mul(dh * (h_prev - n), z * (1 - z), out=dz)
            torch.mul(dn * hn, r * (1 - r), out=dr)
            dgh = d_gates_h[t]
            dgh[:, : 2 * dn.shape[1]] = dx[:, : 2 * dn.shape[1]]
            torch.mul(dn, r, out=dgh[:, 2 * dn.shape[1] :])
            dh = torch.addmm(dh * z, dgh, w_hh)
        else:
            h = gates[t]
            if mode == "rnn_tanh":
                torch.mul(dh, 1 - h * h, out=dx)
            else:
                torch.mul(dh, (h > 0).to(dh.dtype), out=dx)
            dh = dx @ w_hh
    # Only GRU's recurrent gate gradients differ from the input ones; otherwise return nothing.
    if mode != "gru":
        d_gates_h = d_gates_x.new_empty(0)
    return d_gates_x, d_gates_h, dh, dc


@torch.library.custom_op("dpcompile::rnn_scan", mutates_args=())
def rnn_scan(gates_x: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, w_hh: torch.Tensor,
             b_hh: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RNN layer in one direction over time-major (T, B, G·H) precomputed input gates;
    returns (out (T, B, H), h_T, c_T, activated gates, cells) — the last two saved for backward."""
    out, h_last, c_last, gates, cells = _scan_forward(gates_x, h0, c0, w_hh, b_hh, mode)
    return out, h_last, c_last, gates, cells


@rnn_scan.register_fake
def _(gates_x, h0, c0, w_hh, b_hh, mode):
    steps, batch, _ = gates_x.shape
    hidden = h0.shape[-1]
    out = gates_x.new_empty(steps, batch, hidden)
    return out, h0.new_empty(h0.shape), c0.new_empty(h0.shape), torch.empty_like(gates_x), gates_x.new_empty(steps, batch, hidden)


@torch.library.custom_op("dpcompile::rnn_scan_backward", mutates_args=())
def rnn_scan_backward(d_out: torch.Tensor, d_h: torch.Tensor, d_c: torch.Tensor, gates: torch.Tensor,
                      cells: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, out: torch.Tensor,
                      w_hh: torch.Tensor, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Backpropagation through time: (d gates_x, d gates_h (B, T, G·H), d h0, d c0); d gates_h is
    empty unless mode is "gru" (elsewhere it equals d gates_x)."""
    d_gates_x, d_gates_h, d_h0, d_c0 = _scan_backward(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, mode)
    return d_gates_x, d_gates_h, d_h0, d_c0


@rnn_scan_backward.register_fake
def _(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, mode):
    d_gates_h = torch.empty_like(gates) if mode == "gru" else gates.new_empty(0)
    return torch.empty_like(gates), d_gates_h, torch.empty_like(h0), torch.empty_like(h0)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, ...]) -> None:
    gates_x, h0, c0, w_hh, b_hh, mode = inputs
    out, _, _, gates, cells = output
    ctx.save_for_backward(gates, cells, h0, c0, out, w_hh)
    ctx.mode = mode
    ctx.mark_non_differentiable(gates, cells)


def _backward(ctx: Any, d_out: torch.Tensor | None, d_h: torch.Tensor | None, d_c: torch.Tensor | None,
              _d_gates: Any, _d_cells: Any) -> tuple[Any, ...]:
    gates, cells, h0, c0, out, w_hh = ctx.saved_tensors
    d_out = torch.zeros_like(out) if d_out is None else d_out
    d_h = torch.zeros_like(h0) if d_h is None else d_h
    d_c = torch.zeros_like(h0) if d_c is None else d_c
    d_gx, d_gh, d_h0, d_c0 = rnn_scan_backward(d_out, d_h, d_c, gates, cells, h0, c0, out, w_hh, ctx.mode)
    if ctx.mode != "gru":
        d_gh = d_gx  # the recurrent gates are the input gates
    hidden = h0.shape[-1]
    h_prev = torch.cat([h0.unsqueeze(0), out[:-1]], 0)  # (T, B, H)
    # Recurrent weight gradients as plain graph ops: one reducing matmul over (B·T) rows.
    d_w_hh = d_gh.reshape(-1, d_gh.shape[-1]).t().mm(h_prev.reshape(-1, hidden))
    d_b_hh = d_gh.sum((0, 1))
    return d_gx, d_h0, d_c0, d_w_hh, d_b_hh, None


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
            out, h_last, c_last, _, _ = rnn_scan(gates_x, h0, c0, w_hh, b_hh, mode)
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
