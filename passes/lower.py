"""lower: run a rewritten graph, through TorchInductor or eagerly (for debugging)."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Collection, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx

from passes.kernels import for_inductor
from passes.partition import SplitGraphs, accepting_any_strides, donatable_saved

Backend = Literal["inductor", "eager"]


def lower(graph_module: fx.GraphModule, backend: Backend = "inductor", *,
          keep_output_strides: bool = True, donated: Collection[str] = ()) -> Callable[..., Any]:
    """A callable running ``graph_module``: compiled by Inductor, or the graph itself.

    Under Inductor, recurrence scans also compile their per-step cells (one kernel per step),
    embedding gradients on CPU run as an eager row sum and max-pooling gradients as the aten
    kernel (see passes/kernels.py).

    ``keep_output_strides=False`` lets Inductor return outputs in the layout it computed them in
    (for a forward whose saved values go to a backward that accepts any strides). ``donated``
    names inputs the caller never reads after the call: Inductor may write into them.
    """
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        graph_module = for_inductor(graph_module)
        # Shapes are static: one compiled graph per physical batch shape, never re-specialized.
        if donated:
            if not keep_output_strides:
                raise ValueError("donated inputs are only supported with keep_output_strides=True")
            return torch.compile(graph_module, backend=_donating_inductor(frozenset(donated)),
                                 fullgraph=True, dynamic=False)
        options: dict[str, str | int | bool | Callable[..., Any]] | None = (
            None if keep_output_strides else {"keep_output_stride": False}
        )
        return torch.compile(graph_module, backend="inductor", fullgraph=True, dynamic=False, options=options)
    raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")


def compile_function(fn: Callable[..., Any], tensors: Sequence[torch.Tensor],
                     config_patches: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``fn`` traced once with fake tensors like ``tensors`` and compiled by Inductor, called
    without Dynamo: every call must pass tensors of the same shapes, strides, dtypes and devices.

    For small functions called often (a recurrence cell per time step, the noise sampler per
    step), where Dynamo's guards and AOTAutograd's runtime wrapper would cost tens of µs a call.
    """
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    graph = make_fx(fn, tracing_mode="fake")(*tensors)
    # Inductor's on-disk graph cache needs a shape environment (without one every process
    # compiles again, 10-20 s for the noise kernel); static shapes keep the kernel specialized.
    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    fake = [fake_mode.from_tensor(t, static_shapes=True) for t in tensors]
    with tracing(TracingContext(fake_mode)):
        compiled: Callable[..., Any] = compile_fx(graph, fake, config_patches=config_patches or {})  # type: ignore[assignment]
    return compiled


def _donating_inductor(donated: frozenset[str]) -> Callable[..., Any]:
    """Inductor as a torch.compile backend, told that the inputs named ``donated`` are dead after
    the call, as AOTAutograd tells it for the saved values of its own backward: a kernel may then
    write its result into a saved value it last reads instead of a fresh buffer.

    Measured on the CIFAR-10 CNN at batch 256 (2 CPU cores): the first layer's output gradient
    (33.5 MB) reuses the saved activation, as in the non-private backward; without it the fresh
    buffer cost 8,200 page faults a step and the step 101 → 92 ms.

    Uses Inductor's backward-graph hooks (``is_backward``, the tracing context's donated indices);
    where a PyTorch version lacks them, an input cannot be matched to its name, or the generated
    code reuses a buffer that is read later (:func:`reuses_only_dead_buffers`), the graph is
    compiled without donation.
    """
    from torch._dynamo.source import LocalSource
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    def backend(gm: fx.GraphModule, example_inputs: list[Any]) -> Any:
        # Dynamo orders (and drops unused) inputs by first use: find the donated ones by name.
        names = []
        for node in gm.graph.find_nodes(op="placeholder"):
            source = getattr(node.meta.get("grapharg"), "source", None)
            names.append(source.local_name if isinstance(source, LocalSource) else None)
        positions = [k for k, name in enumerate(names) if name in donated]
        compiler_config: Any = torch.compiler.config
        functorch_config: Any = torch._functorch.config
        if not positions or not hasattr(compiler_config, "cache_key_tag") \
                or not hasattr(functorch_config, "enable_autograd_cache"):
            return compile_fx(gm, example_inputs)

        def inner(graph: fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
            context = torch._guards.TracingContext.try_get()
            metadata: Any = getattr(context, "fw_metadata", None)
            if len(inputs) != len(names) or not hasattr(metadata, "bw_donated_idxs"):
                return compile_fx_inner(graph, inputs, **kwargs)
            previous = metadata.bw_donated_idxs
            metadata.bw_donated_idxs = positions
            try:
                compiled = compile_fx_inner(graph, inputs, **{**kwargs, "is_backward": True})
            finally:
                metadata.bw_donated_idxs = previous
            if reuses_only_dead_buffers(getattr(compiled, "source_code", "")):
                return compiled
            recorded_strides = getattr(context, "output_strides", None)
            if recorded_strides:
                recorded_strides.clear()  # recorded by the rejected compile
            return compile_fx_inner(graph, inputs, **kwargs)

        # Inductor's caches do not key on donation: keep these graphs apart from any other, and
        # skip AOTAutograd's cache, whose hits would bypass the check in `inner`.
        tag = f"{compiler_config.cache_key_tag}|dpcompile-donated:{positions}"
        with compiler_config.patch(cache_key_tag=tag), functorch_config.patch(enable_autograd_cache=False):
            return compile_fx(gm, example_inputs, inner_compile=inner)

    return backend


def lower_split(graphs: SplitGraphs, backend: Backend = "inductor") -> tuple[Callable[..., Any], Callable[..., Any], bool]:
    """The forward and the private backward of one split, lowered together.

    Inductor computes a convolution net's forward channels-last on CPU. When the backward
    accepts saved values of any strides, the forward hands them over in that layout instead of
    copying each back (and the backward's kernels run channels-last too). The flag says the
    forward's outputs may come back in such a layout: the caller restores model outputs.
    Without convolutions Inductor keeps the traced layouts, and both graphs stay as they are.

    The backward may write into the saved values the forward computed (:func:`donatable_saved`):
    call it at most once per forward call, and never read those values afterwards.
    """
    convolves = any(n.target is torch.ops.aten.convolution.default for n in graphs.forward.graph.nodes)
    any_strides = accepting_any_strides(graphs.backward) if backend == "inductor" and convolves else None
    relaid = any_strides is not None
    forward = lower(graphs.forward, backend, keep_output_strides=not relaid)
    backward = any_strides or graphs.backward
    saved_inputs = list(inspect.signature(backward.forward).parameters)[: graphs.num_saved]
    donated = [saved_inputs[k] for k in donatable_saved(graphs)]
    return forward, lower(backward, backend, donated=donated), relaid


_REUSE = re.compile(r"^\s*(\w+) = (?:reinterpret_tensor\()?(\w+)\b.*; del \2\s+# reuse")
_ALIAS = re.compile(r"^\s*(\w+) = (?:reinterpret_tensor\(|torch\.as_strided\()?(\w+)\b(?:\[.*\])?[^=]*# alias")


def reuses_only_dead_buffers(source: str) -> bool:
    """Whether Inductor's wrapper code never reads a buffer, or a view of it, after handing its
    memory to another buffer (``x = arg; del arg  # reuse``).

    Guards donation against a scheduling bug seen in torch 2.13: with the low-memory graph of the
    MNIST CNN a saved input was reused while a later kernel still read it (the wrapper failed
    with UnboundLocalError; through a view it would have read overwritten values). Straight-line
    wrapper code makes the check syntactic: every read names the buffer or one of its views.
    """
    start = source.find("def call(")
    if start < 0:
        return False
    _, *body = source[start:].splitlines()  # the lines after `def call(`
    indent = len(source[: start].rsplit("\n", 1)[-1])  # the def's own indentation
    views: dict[str, set[str]] = {}  # buffer -> names that view its memory
    dead: set[str] = set()
    for line in body:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break  # end of `call`
        reuse = _REUSE.match(line)
        if reuse:
            new, old = reuse.groups()
            if old in dead:
                return False
            dead |= {old, *views.get(old, set())}
            continue
        names = set(re.findall(r"\b\w+\b", line))
        if names & dead:
            return False
        alias = _ALIAS.match(line)
        if alias:
            view, base = alias.groups()
            for root in (base, *(b for b, vs in views.items() if base in vs)):
                views.setdefault(root, set()).add(view)
    return True
