"""Flat and per-layer clipping, masks, batch size one, and what the rewritten graph contains."""

import pytest
import torch
from torch import nn

from passes import PerSampleGradients, analyze, capture, private_backward
from tests.passes.harness import assert_matches_reference, cross_entropy, sum_loss

D = torch.float64


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)
    ).to(D)


@pytest.mark.parametrize("clipping", ["flat", "per_layer"])
def test_clipping_modes(clipping):
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 6, 6, dtype=D), torch.randint(0, 4, (5,))
    assert_matches_reference(small_cnn(), x, y, cross_entropy, clipping=clipping)


def test_mask_removes_samples():
    torch.manual_seed(0)
    x, y = torch.randn(5, 1, 6, 6, dtype=D), torch.randint(0, 4, (5,))
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0], dtype=D)
    assert_matches_reference(small_cnn(), x, y, cross_entropy, mask=mask)


def test_masked_rows_contribute_nothing_even_with_huge_values():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).to(D)
    x = torch.randn(4, 3, dtype=D)
    x[1] = 1e30
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=D)
    compiled = PerSampleGradients(model, sum_loss, backend="eager")
    full = compiled(x, max_grad_norm=1.0, mask=mask).clipped_grads
    kept = compiled(x[[0, 2, 3, 0]], max_grad_norm=1.0, mask=torch.tensor([1.0, 1, 1, 0], dtype=D)).clipped_grads
    for name in full:
        torch.testing.assert_close(full[name], kept[name])


def test_batch_of_one():
    torch.manual_seed(0)
    x, y = torch.randn(1, 1, 6, 6, dtype=D), torch.randint(0, 4, (1,))
    assert_matches_reference(small_cnn(), x, y, cross_entropy)


def test_unclipped_sum_equals_plain_gradient():
    """With C above every norm, the clipped sum is the ordinary gradient of Σ losses."""
    torch.manual_seed(0)
    model = small_cnn()
    x, y = torch.randn(4, 1, 6, 6, dtype=D), torch.randint(0, 4, (4,))
    result = PerSampleGradients(model, cross_entropy, backend="eager")(x, y, max_grad_norm=1e9)
    loss = cross_entropy(model(x), y).sum()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), g in zip(model.named_parameters(), grads):
        torch.testing.assert_close(result.clipped_grads[name], g)


def test_compiles_once_per_batch_shape():
    model = nn.Linear(3, 2).to(D)
    compiled = PerSampleGradients(model, sum_loss, backend="eager")
    for _ in range(3):
        compiled(torch.randn(4, 3, dtype=D), max_grad_norm=1.0)
    assert compiled.num_compiled == 1
    compiled(torch.randn(6, 3, dtype=D), max_grad_norm=1.0)
    assert compiled.num_compiled == 2


def test_linear_on_flat_input_never_materializes_per_sample_weights():
    """Linear on (B, d): ghost norm ‖a‖²‖g‖²; no (B, p, d) tensor anywhere in the graph."""
    batch, d_in, d_out = 8, 32, 16
    model = nn.Sequential(nn.Linear(d_in, d_out), nn.ReLU(), nn.Linear(d_out, 4)).to(D)
    x = torch.randn(batch, d_in, dtype=D)
    cap = capture(model, (x,), sum_loss)
    private = private_backward(cap, analyze(cap))
    assert private.plans["0.weight"].strategy == "ghost"
    for node in private.graph_module.graph.nodes:
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            assert val.numel() < batch * d_in * d_out, (
                f"{node.format_node()} has shape {tuple(val.shape)}: a per-sample weight gradient"
            )


def test_plain_weight_gradients_are_replaced_not_duplicated():
    """The rewritten graph computes each weight gradient once (with clipped signals). (Hidden
    gradients at least twice their upstream's size are recomputed: tests/passes/test_recomputed_signals.py.)"""
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4)).to(D)
    x = torch.randn(4, 5, dtype=D)
    cap = capture(model, (x,), sum_loss)
    original = sum(1 for n in cap.graph_module.graph.nodes if n.target == torch.ops.aten.mm.default)
    private = private_backward(cap, analyze(cap))
    rewritten = sum(1 for n in private.graph_module.graph.nodes if n.target == torch.ops.aten.mm.default)
    assert rewritten == original
