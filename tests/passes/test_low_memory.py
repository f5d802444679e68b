"""low_memory: flat clipping's clipped sums from a second backward with scaled seeds."""

import operator

import pytest
import torch
from torch import nn

from passes import PerSampleGradients, analyze, capture, private_backward
from passes.partition import split
from tests.dpcompile import models
from tests.passes.harness import assert_matches_reference, cross_entropy

D = torch.float64
BATCH = 8

CASES = {
    "mlp": models.MLP,
    "cnn": models.CNN,
    "seq": models.SeqLinearNorm,
    "embedding": models.TextEmbedding,
    "transformer": models.Transformer,
    "lstm": models.LSTMClassifier,
    "tied": models.Tied,
    "twice": models.Twice,
    "raw": models.RawParameter,
}


@pytest.mark.parametrize("name", list(CASES))
def test_second_backward_matches_reference(name):
    torch.manual_seed(0)
    model = CASES[name]().to(D)
    x, y = models.dataset_for(name, n=7)
    x = x.to(D) if x.is_floating_point() else x
    mask = torch.tensor([1.0, 1, 0, 1, 1, 0, 1], dtype=D)
    assert_matches_reference(model, x, y, cross_entropy, mask=mask, low_memory=True)


def test_second_backward_on_model_outputs_with_seeds_per_element():
    """Not a loss: the seeds are (B, classes) output gradients, scaled per sample."""
    torch.manual_seed(1)
    model = models.MLP().to(D)
    assert_matches_reference(model, torch.randn(6, 6, dtype=D), low_memory=True)


def _private_graph(low_memory, clipping="flat", nonfinite="error"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(D)
    x, y = torch.randn(BATCH, 6, dtype=D), torch.randint(0, 3, (BATCH,))
    cap = capture(model, [x], cross_entropy, [y])
    return private_backward(cap, analyze(cap), clipping, nonfinite=nonfinite, low_memory=low_memory)


def _signals_live_after_norms(private) -> int:
    """Elements of per-sample backward signals (values computed from the seeds) still needed
    once the per-sample norms are computed."""
    nodes = list(private.graph_module.graph.nodes)
    output = nodes[-1]
    norms = output.args[0][1]
    position = {n: k for k, n in enumerate(nodes)}
    placeholders = [n for n in nodes if n.op == "placeholder"]
    captured = len(private.capture.placeholders())
    signals = set(placeholders[captured - private.capture.num_outputs : captured])
    for n in nodes:
        if any(a in signals for a in n.all_input_nodes):
            signals.add(n)
    live = 0
    for n in nodes[: position[norms]]:
        val = n.meta.get("val")
        if n not in signals or n.target is operator.getitem or not isinstance(val, torch.Tensor):
            continue
        if val.shape[:1] == (BATCH,) and any(position[u] > position[norms] and u is not output for u in n.users):
            live += val.numel()
    return live


def test_backward_signals_die_before_the_clip_factors():
    one_pass, two_pass = _private_graph(False), _private_graph(True)
    # One pass keeps the layers' backward signals for the scaled matmuls; the second backward
    # recomputes them from scaled seeds: at most a scalar per sample (the loss's) outlives the norms.
    assert _signals_live_after_norms(one_pass) >= BATCH * (32 + 32)
    assert _signals_live_after_norms(two_pass) <= BATCH


@pytest.mark.parametrize("clipping, nonfinite", [("per_layer", "error"), ("flat", "drop")])
def test_modes_a_single_scaled_backward_cannot_serve_keep_one_pass(clipping, nonfinite):
    """Per-layer factors differ by parameter; dropped samples may be NaN all through a backward."""
    low, plain = _private_graph(True, clipping, nonfinite), _private_graph(False, clipping, nonfinite)
    assert str(low.graph_module.graph) == str(plain.graph_module.graph)


def test_split_and_compiled_second_backward():
    graphs = split(_private_graph(True))
    assert graphs.num_saved > 0
    torch.manual_seed(0)
    model = models.Transformer()
    x, y = models.dataset_for("transformer", n=6)
    fast = PerSampleGradients(model, cross_entropy)
    low = PerSampleGradients(model, cross_entropy, low_memory=True)
    a, b = fast(x, y, max_grad_norm=0.1), low(x, y, max_grad_norm=0.1)
    torch.testing.assert_close(b.per_sample_norms, a.per_sample_norms, rtol=1e-4, atol=1e-6)
    for name, grad in a.clipped_grads.items():
        torch.testing.assert_close(b.clipped_grads[name], grad, rtol=1e-4, atol=1e-6)
