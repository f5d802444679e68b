"""Lowering-time op substitutions: eager row sums for embedding gradients on CPU, the aten
kernel for max-pooling gradients (an Inductor miscompile), and the reuse check on donated inputs."""

import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from passes import analyze, capture, private_backward
from passes.kernels import embedding_rows_sum, with_eager_max_pool_backward, with_eager_row_sums
from passes.lower import lower_split, reuses_only_dead_buffers
from passes.partition import accepting_any_strides, split
from passes.rewrite import example_private_inputs

aten = torch.ops.aten


@pytest.mark.parametrize("padding_idx", [-1, 0, 3])
def test_row_sum_equals_embedding_dense_backward(padding_idx):
    torch.manual_seed(0)
    grad = torch.randn(4, 7, 5, dtype=torch.float64)
    indices = torch.randint(0, 6, (4, 7))  # repeats, and the padding row
    expected = aten.embedding_dense_backward(grad, indices, 9, padding_idx, False)
    torch.testing.assert_close(embedding_rows_sum(grad, indices, 9, padding_idx), expected, rtol=0, atol=1e-13)


def test_lowering_replaces_only_unscaled_cpu_row_sums():
    def f(grad, indices):
        return (aten.embedding_dense_backward(grad, indices, 9, -1, False),
                aten.embedding_dense_backward(grad, indices, 9, -1, True))

    grad, indices = torch.randn(4, 7, 5), torch.randint(0, 9, (4, 7))
    gm = make_fx(f)(grad, indices)
    lowered = with_eager_row_sums(gm)
    targets = [n.target for n in lowered.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.dpcompile.embedding_rows_sum.default) == 1
    assert targets.count(aten.embedding_dense_backward.default) == 1  # scale_grad_by_freq kept
    for got, expected in zip(lowered(grad, indices), f(grad, indices)):
        torch.testing.assert_close(got, expected)
    # the input graph is left as it was
    assert sum(n.target is aten.embedding_dense_backward.default for n in gm.graph.nodes) == 2


def test_max_pool_gradients_run_the_aten_kernel():
    def f(x, grad):
        _, indices = aten.max_pool2d_with_indices(x, [2, 2], [1, 1])
        return aten.max_pool2d_with_indices_backward(grad, x, [2, 2], [1, 1], [0, 0], [1, 1], False, indices)

    x = torch.randn(2, 3, 6, 6).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 3, 5, 5)
    lowered = with_eager_max_pool_backward(make_fx(f)(x, grad))
    targets = [n.target for n in lowered.graph.nodes]
    assert torch.ops.dpcompile.max_pool2d_backward.default in targets
    assert aten.max_pool2d_with_indices_backward.default not in targets
    got = lowered(x, grad)
    torch.testing.assert_close(got, f(x, grad), rtol=0, atol=0)
    assert got.stride() == f(x, grad).stride()


def test_low_memory_max_pool_net_compiles_to_the_eager_values():
    """The MNIST CNN's low-memory graph (two pooling gradients per layer from the same indices,
    channels-last saved values): Inductor's scatter decomposition read its zero-filled buffer
    before the scatter, and the convolutions' clipped sums came out as zeros."""
    torch.manual_seed(0)
    d = torch.float64
    model = nn.Sequential(
        nn.Conv2d(1, 16, 8, 2, padding=3), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Conv2d(16, 32, 4, 2), nn.ReLU(), nn.MaxPool2d(2, 1),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 32), nn.ReLU(), nn.Linear(32, 10)).to(d)
    cap = capture(model, [torch.randn(8, 1, 28, 28, dtype=d)])
    graphs = split(private_backward(cap, analyze(cap), low_memory=True))
    inputs = example_private_inputs(cap)
    num_forward = cap.num_params + len(cap.buffers) + cap.num_batch
    forward, backward, _ = lower_split(graphs, "inductor")
    saved = list(forward(*inputs[:num_forward])[graphs.num_outputs :])
    expected = accepting_any_strides(graphs.backward)(*[s.clone() for s in saved], *inputs[num_forward:])
    got = backward([*saved, *inputs[num_forward:]])
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-12)
    assert all(e.abs().max() > 0 for e in expected[1:])  # the check could fail: nothing is zero


_WRAPPER = """
class Runner:
    def call(self, args):
        arg0_1, arg1_1 = args
        args.clear()
        buf0 = empty_strided_cpu((4, 4), (4, 1), torch.float32)
        kernel_0(arg0_1, buf0)
        buf1 = reinterpret_tensor(arg1_1, (16, ), (1, ), 0)  # alias
{middle}
        return (buf2, )
def get_args():
    arg0_1 = rand_strided((4, 4), (4, 1), device='cpu', dtype=torch.float32)
"""


@pytest.mark.parametrize("middle, safe", [
    ("        buf2 = arg0_1; del arg0_1  # reuse\n        kernel_1(buf0, buf2)", True),
    ("        buf2 = arg0_1; del arg0_1  # reuse\n        kernel_1(arg0_1, buf2)", False),  # read after reuse
    ("        buf2 = reinterpret_tensor(arg1_1, (4, 4), (4, 1), 0); del arg1_1  # reuse\n"
     "        kernel_1(buf1, buf2)", False),  # read through a view of the reused buffer
    ("        buf2 = buf0; del buf0  # reuse\n        kernel_1(buf1, buf2)", True),
], ids=["dead", "read-after", "read-through-view", "other-buffer"])
def test_wrapper_reuse_check(middle, safe):
    assert reuses_only_dead_buffers(_WRAPPER.format(middle=middle)) is safe
    assert not reuses_only_dead_buffers("no wrapper here")
