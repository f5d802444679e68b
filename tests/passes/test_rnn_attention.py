"""Unmodified nn.LSTM / nn.GRU / nn.RNN and nn.MultiheadAttention / TransformerEncoderLayer."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from tests.passes.harness import assert_matches_reference

D = torch.float64


class RNNHead(nn.Module):
    def __init__(self, rnn: nn.RNNBase, use_state: bool):
        super().__init__()
        self.rnn = rnn
        self.use_state = use_state
        width = rnn.hidden_size * (2 if rnn.bidirectional else 1)
        self.head = nn.Linear(rnn.hidden_size if use_state else width, 2)

    def forward(self, x):
        out, state = self.rnn(x)
        if self.use_state:
            h = state[0] if isinstance(state, tuple) else state
            return self.head(h[-1])
        last = out[:, -1] if self.rnn.batch_first else out[-1]
        return self.head(last)


@settings(settings.get_profile("slow-sweeps"))
@given(
    kind=st.sampled_from(["lstm", "gru", "rnn_tanh", "rnn_relu"]),
    layers=st.integers(1, 2),
    bidirectional=st.booleans(),
    batch_first=st.booleans(),
    bias=st.booleans(),
    batch=st.integers(1, 3),
    seq=st.integers(1, 5),
    use_state=st.booleans(),
)
def test_rnn(kind, layers, bidirectional, batch_first, bias, batch, seq, use_state):
    torch.manual_seed(batch * 7 + seq)
    kwargs = dict(num_layers=layers, bidirectional=bidirectional, batch_first=batch_first, bias=bias)
    if kind == "lstm":
        rnn = nn.LSTM(3, 4, **kwargs)
    elif kind == "gru":
        rnn = nn.GRU(3, 4, **kwargs)
    else:
        rnn = nn.RNN(3, 4, nonlinearity=kind.split("_")[1], **kwargs)
    model = RNNHead(rnn, use_state).to(D)
    shape = (batch, seq, 3) if batch_first else (seq, batch, 3)
    assert_matches_reference(model, torch.randn(*shape, dtype=D), batch_dim=0 if batch_first else 1)


def test_lstm_projection():
    torch.manual_seed(0)
    model = RNNHead(nn.LSTM(3, 5, proj_size=2, batch_first=True), use_state=False).to(D)
    model.head = nn.Linear(2, 2).to(D)
    assert_matches_reference(model, torch.randn(3, 4, 3, dtype=D))


class SelfAttention(nn.Module):
    def __init__(self, batch_first: bool, bias: bool, kdim: bool):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2, batch_first=batch_first, bias=bias,
                                         kdim=6 if kdim else None, vdim=6 if kdim else None)
        self.batch_first = batch_first
        self.kdim = kdim

    def forward(self, x, memory):
        kv = memory if self.kdim else x
        out = self.mha(x, kv, kv, need_weights=False)[0]
        return out if self.batch_first else out.transpose(0, 1)  # the loss wants batch first


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kdim", [True, False])
def test_multihead_attention(batch_first, bias, kdim):
    torch.manual_seed(int(batch_first) + 2 * int(bias))
    model = SelfAttention(batch_first, bias, kdim).to(D)
    b, t = 3, 4
    x = torch.randn(b, t, 8, dtype=D) if batch_first else torch.randn(t, b, 8, dtype=D)
    mem = torch.randn(b, 5, 6, dtype=D) if batch_first else torch.randn(5, b, 6, dtype=D)
    assert_matches_reference(model, (x, mem), batch_dim=0 if batch_first else 1)


def test_attention_with_key_padding_mask():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x, pad):
            return self.mha(x, x, x, key_padding_mask=pad, need_weights=False)[0]

    torch.manual_seed(0)
    pad = torch.zeros(3, 5, dtype=torch.bool)
    pad[0, 3:] = True
    pad[2, 4:] = True
    assert_matches_reference(Masked().to(D), (torch.randn(3, 5, 8, dtype=D), pad))


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer(norm_first, activation):
    torch.manual_seed(1)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True,
                                       norm_first=norm_first, activation=activation)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).to(D)
    assert_matches_reference(model, torch.randn(3, 6, 8, dtype=D))


@pytest.mark.inductor
@pytest.mark.parametrize("mode, gates", [("lstm", 4), ("gru", 3), ("rnn_tanh", 1), ("rnn_relu", 1)])
def test_fused_cells_match_eager_cells(mode, gates):
    """Compiled per-step cells (what the Inductor lowering selects) compute the eager scan's values."""
    from passes import rnn

    torch.manual_seed(0)
    steps, batch, hidden = 5, 3, 4
    gx, w = torch.randn(steps, batch, gates * hidden, dtype=D), torch.randn(gates * hidden, hidden, dtype=D)
    # Initial states not contiguous: a compiled cell is specialized to its first call's strides.
    b, h0, c0 = torch.randn(gates * hidden, dtype=D), torch.randn(hidden, batch, dtype=D).t(), torch.randn(hidden, batch, dtype=D).t()
    eager = rnn._scan_forward(gx, h0, c0, w, b, mode, False)
    fused = rnn._scan_forward(gx, h0, c0, w, b, mode, True)
    d_out, d_h, d_c = torch.randn_like(eager[0]), torch.randn(hidden, batch, dtype=D).t(), torch.randn_like(c0)
    saved = (eager[3], eager[4], h0, c0, eager[0], w)
    eager_grads = rnn._scan_backward(d_out, d_h, d_c, *saved, mode, False)
    fused_grads = rnn._scan_backward(d_out, d_h, d_c, *saved, mode, True)
    if mode.startswith("rnn"):  # plain RNNs leave the cells buffer unused
        eager, fused = eager[:4], fused[:4]
    for expected, got in zip(eager + eager_grads, fused + fused_grads):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    # outputs never alias inputs (custom-op contract), whichever state passes through
    for got in fused_grads:
        assert all(got.data_ptr() != t.data_ptr() for t in (d_out, d_h, d_c) if got.numel())


def test_inductor_lowering_fuses_scan_cells():
    from passes.kernels import with_fused_cells
    from passes.rnn import rnn_scan

    def f(gx, h0, c0, w, b):
        return rnn_scan(gx, h0, c0, w, b, "lstm", False)[0]

    from torch.fx.experimental.proxy_tensor import make_fx

    args = (torch.randn(3, 2, 8), torch.randn(2, 2), torch.randn(2, 2), torch.randn(8, 2), torch.randn(8))
    gm = make_fx(f)(*args)
    fused = with_fused_cells(gm)
    scans = [n for n in fused.graph.nodes if n.target is torch.ops.dpcompile.rnn_scan.default]
    assert [n.args[-1] for n in scans] == [True]
    assert [n.args[-1] for n in gm.graph.nodes if n.target is torch.ops.dpcompile.rnn_scan.default] == [False]


@pytest.mark.inductor
def test_fused_cells_survive_many_configurations():
    """Many configurations (batch sizes, dtypes) in one process, each with its own compiled cell
    (more than the 8 recompilations Dynamo allowed one function when cells went through it)."""
    from passes import rnn

    for batch in range(2, 7):
        for dtype in (torch.float32, torch.float64):
            gx = torch.randn(2, batch, 4 * 3, dtype=dtype)
            h0, c0 = torch.zeros(batch, 3, dtype=dtype), torch.zeros(batch, 3, dtype=dtype)
            w, b = torch.randn(12, 3, dtype=dtype), torch.randn(12, dtype=dtype)
            expected = rnn._scan_forward(gx, h0, c0, w, b, "lstm", False)[0]
            torch.testing.assert_close(rnn._scan_forward(gx, h0, c0, w, b, "lstm", True)[0], expected)
