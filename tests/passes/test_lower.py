"""BoxedGraph: the compiled private backward's calling convention (one list, emptied by the call)
frees each input at its last use inside the compiled code, not when the call returns.
DirectGraph: the forward, compiled once per argument layout and called without Dynamo."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from passes.lower import BoxedGraph, DirectGraph

_probe_target: list[weakref.ref[torch.Tensor]] = []
_probe_saw_freed: list[bool] = []


@torch.library.custom_op("dpcompile_test::probe_freed", mutates_args=())
def probe_freed(x: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """``x`` times one, recording whether the probed tensor was already freed (runs after
    ``after`` is computed: the data dependency orders it after the probed tensor's last use)."""
    _probe_saw_freed.append(_probe_target[0]() is None)
    return x.clone()


@probe_freed.register_fake
def _(x: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def _graph() -> fx.GraphModule:
    def f(big: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total = big.sum()  # the last use of `big`
        return (probe_freed(other, total).sum() + total,)

    return make_fx(f, tracing_mode="fake")(torch.randn(64, 64), torch.randn(8))


@pytest.mark.parametrize("backend, freed_early", [("inductor", True), ("eager", False)])
def test_boxed_graph_frees_each_input_at_its_last_use(backend: str, freed_early: bool) -> None:
    graph = BoxedGraph(_graph(), backend)  # type: ignore[arg-type]
    big, other = torch.randn(64, 64), torch.randn(8)
    expected = big.sum() + other.sum()
    for _ in range(2):  # the first call compiles, the second runs the cached kernel
        args = [big.clone(), other]
        _probe_target[:] = [weakref.ref(args[0])]
        _probe_saw_freed.clear()
        (out,) = graph(args)
        assert args == []  # the call took the arguments
        torch.testing.assert_close(out, expected)
        assert _probe_saw_freed == [freed_early]
    assert len(graph.compiled) == (1 if backend == "inductor" else 0)


def test_boxed_graph_compiles_again_for_a_new_layout() -> None:
    graph = BoxedGraph(_graph(), "inductor")
    big, other = torch.randn(64, 64), torch.randn(8)
    _probe_target[:] = [weakref.ref(big)]
    for tensor in (big, big.t()):  # transposed: other strides, same values summed
        (out,) = graph([tensor, other])
        torch.testing.assert_close(out, big.sum() + other.sum())
    assert len(graph.compiled) == 2


@pytest.mark.inductor
def test_direct_graph_compiles_once_per_layout_and_records_no_history():
    def f(weight: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        h = torch.relu(x @ weight.t())
        return (h, h.sum(1))

    weight = torch.randn(5, 3, requires_grad=True)
    graph = make_fx(f, tracing_mode="fake")(weight.detach(), torch.randn(4, 3))
    forward = DirectGraph(graph)
    for rows in (4, 4, 7):
        x = torch.randn(rows, 3)
        out = forward(weight, x)
        expected = f(weight.detach(), x)
        for got, want in zip(out, expected):
            torch.testing.assert_close(got, want)
            assert not got.requires_grad  # the caller's own backward differentiates it
    assert len(forward.compiled) == 2  # rows 4 (twice) and rows 7


def _counting_registration(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Replace Inductor's joint-graph pattern registration with a counter of its calls."""
    from torch._inductor.fx_passes import joint_graph

    calls: list[int] = []
    monkeypatch.setattr(joint_graph, "lazy_init", lambda *args, **kwargs: calls.append(1))
    return calls


@pytest.mark.parametrize("with_softmax", [False, True])
def test_joint_patterns_are_registered_only_for_graphs_they_can_match(monkeypatch, with_softmax):
    """On CPU, a graph with no softmax (and no randperm) is compiled without registering the
    joint-graph patterns (none can match it); one with a softmax registers them."""
    from passes.lower import compile_function

    calls = _counting_registration(monkeypatch)

    def f(x: torch.Tensor) -> torch.Tensor:
        y = torch.tanh(x) * 2
        return torch.softmax(y, -1) if with_softmax else y

    x = torch.randn(4, 8)
    # a graph from AOTAutograd's cache skips the joint-graph pass, and the registration, anyway
    with torch._functorch.config.patch(enable_autograd_cache=False):
        result = compile_function(f, [x])(x)
    torch.testing.assert_close(result, f(x))
    assert bool(calls) == with_softmax


def test_unmatchable_patterns_context_restores_the_registration() -> None:
    from torch._inductor.fx_passes import joint_graph

    from passes.lower import unmatchable_patterns_unregistered

    register = joint_graph.lazy_init
    plain = make_fx(lambda x: x * 2)(torch.randn(3))
    attention = make_fx(lambda x: torch.softmax(x, 0))(torch.randn(3))
    with unmatchable_patterns_unregistered(plain, [torch.randn(3)]):
        assert joint_graph.lazy_init is not register
    assert joint_graph.lazy_init is register
    with unmatchable_patterns_unregistered(attention, [torch.randn(3)]):
        assert joint_graph.lazy_init is register
    # off the CPU (a GPU's matrix products may be padded) the patterns stay: "meta" stands in
    with unmatchable_patterns_unregistered(plain, [torch.empty(3, device="meta")]):
        assert joint_graph.lazy_init is register
