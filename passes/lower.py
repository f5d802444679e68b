"""lower: run a rewritten graph, through TorchInductor or eagerly (for debugging)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Iterator, Sequence
from typing import Any, Literal

import torch
import torch.fx as fx

from passes.kernels import for_inductor
from passes.partition import SplitGraphs, accepting_any_strides, donatable_saved
from passes.saved_values import channels_last_masks_and_shapes

Backend = Literal["inductor", "eager"]


def lower(graph_module: fx.GraphModule, backend: Backend = "inductor") -> Callable[..., Any]:
    """A callable running ``graph_module``: compiled by Inductor, or the graph itself.

    Under Inductor, recurrence scans also compile their per-step cells (one kernel per step),
    embedding gradients on CPU run as an eager row sum and max-pooling gradients as the aten
    kernel (see passes/kernels.py).
    """
    if backend == "eager":
        return graph_module
    if backend == "inductor":
        # Shapes are static: one compiled graph per physical batch shape, never re-specialized.
        return torch.compile(for_inductor(graph_module), backend="inductor", fullgraph=True, dynamic=False)
    raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")


class BoxedGraph:
    """``graph_module`` called boxed: with one list of tensors, which the call empties, so each
    input can be freed at its last use inside the graph instead of when the call returns (the
    convention of AOTAutograd's own compiled backward).

    Under Inductor it is compiled without Dynamo on its first call with each layout of arguments
    (shapes, strides, dtypes, devices), and the inputs at positions ``donated`` (never read by
    the caller afterwards) may hold results: a kernel may write into a donated input it last
    reads instead of a fresh buffer.
    """

    def __init__(self, graph_module: fx.GraphModule, backend: Backend = "inductor",
                 donated: Collection[int] = ()) -> None:
        if backend not in ("inductor", "eager"):
            raise ValueError(f"backend must be 'inductor' or 'eager', got {backend!r}")
        self.graph_module = for_inductor(graph_module) if backend == "inductor" else graph_module
        self.backend = backend
        self.donated = frozenset(donated)
        self.compiled: dict[tuple[Any, ...], Callable[[list[Any]], Any]] = {}

    def __call__(self, args: list[Any]) -> Any:
        if self.backend == "eager":
            values = list(args)
            args.clear()
            return self.graph_module(*values)
        layout = _layout(args)
        compiled = self.compiled.get(layout)
        if compiled is None:
            compiled = self.compiled[layout] = compile_boxed(self.graph_module, args, self.donated)
        return compiled(args)


def compile_boxed(graph_module: fx.GraphModule, tensors: Sequence[torch.Tensor],
                  donated: Collection[int] = ()) -> Callable[[list[Any]], Any]:
    """``graph_module`` compiled by Inductor for arguments like ``tensors`` (same shapes, strides,
    dtypes, devices), called with one list of them that the call empties.

    Inputs at positions ``donated`` are dead after the call, as AOTAutograd tells Inductor for the
    saved values of its own backward. Measured on the CIFAR-10 CNN at batch 256 (2 CPU cores): the
    first layer's output gradient (33.5 MB) reuses the saved activation, as in the non-private
    backward; without it the fresh buffer cost 8,200 page faults a step and the step 101 → 92 ms.
    Donation uses Inductor's backward-graph hooks (``is_backward``, the tracing context's donated
    indices); where a PyTorch version lacks them, or the generated code reuses a buffer that is
    read later (:func:`reuses_only_dead_buffers`), the graph is compiled without donation.
    """
    from torch._dynamo.utils import GmWrapper
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx, compile_fx_inner

    fake_mode, fake = _static_fakes(tensors)
    # A GmWrapper tells AOTAutograd the arguments come boxed: its runtime empties the list.
    wrapper = GmWrapper(graph_module, lambda args: args)
    positions = sorted(k for k in donated if k < len(tensors))
    compiler_config: Any = torch.compiler.config
    functorch_config: Any = torch._functorch.config
    if not positions or not hasattr(compiler_config, "cache_key_tag") \
            or not hasattr(functorch_config, "enable_autograd_cache"):
        with tracing(TracingContext(fake_mode)), unmatchable_patterns_unregistered(graph_module, tensors):
            return compile_fx(wrapper, fake)  # type: ignore[arg-type,return-value]
    # AOTAutograd puts the graph's own parameters and buffers (if any) before the arguments.
    attributes = len(dict(wrapper.named_parameters(remove_duplicate=False))) \
        + len(dict(wrapper.named_buffers(remove_duplicate=False)))

    def inner(graph: fx.GraphModule, inputs: list[Any], **kwargs: Any) -> Any:
        context = torch._guards.TracingContext.try_get()
        metadata: Any = getattr(context, "fw_metadata", None)
        # Fewer inputs (AOTAutograd merged duplicate arguments) would move the positions.
        if len(inputs) != attributes + len(tensors) or not hasattr(metadata, "bw_donated_idxs"):
            return compile_fx_inner(graph, inputs, **kwargs)
        previous = metadata.bw_donated_idxs
        metadata.bw_donated_idxs = [attributes + k for k in positions]
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

    # Inductor's caches do not key on donation: keep these graphs apart from any other, and skip
    # AOTAutograd's cache, whose hits would bypass the check in `inner`.
    tag = f"{compiler_config.cache_key_tag}|dpcompile-donated:{positions}"
    with tracing(TracingContext(fake_mode)), compiler_config.patch(cache_key_tag=tag), \
            functorch_config.patch(enable_autograd_cache=False), unmatchable_patterns_unregistered(graph_module, tensors):
        return compile_fx(wrapper, fake, inner_compile=inner)  # type: ignore[arg-type,return-value]


def _static_fakes(tensors: Sequence[Any]) -> tuple[Any, list[Any]]:
    """A fake mode and fakes of ``tensors`` for compiling outside Dynamo. Inductor's on-disk graph
    cache needs a shape environment (without one every process compiles again, 10-20 s for the
    noise kernel); static shapes keep the kernels specialized."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    return fake_mode, [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t
                       for t in tensors]


def compile_function(fn: Callable[..., Any], tensors: Sequence[torch.Tensor],
                     config_patches: dict[str, Any] | None = None) -> Callable[..., Any]:
    """``fn`` traced once with fake tensors like ``tensors`` and compiled by Inductor, called
    without Dynamo: every call must pass tensors of the same shapes, strides, dtypes and devices.

    For small functions called often (a recurrence cell per time step, the noise sampler per
    step), where Dynamo's guards and AOTAutograd's runtime wrapper would cost tens of µs a call.
    """
    from torch.fx.experimental.proxy_tensor import make_fx

    return _compile_graph(make_fx(fn, tracing_mode="fake")(*tensors), tensors, config_patches or {})


def _compile_graph(graph_module: fx.GraphModule, tensors: Sequence[Any],
                   config_patches: dict[str, Any]) -> Callable[..., Any]:
    """An aten graph compiled by Inductor for arguments like ``tensors``, called unboxed."""
    from torch._guards import TracingContext, tracing
    from torch._inductor.compile_fx import compile_fx

    fake_mode, fake = _static_fakes(tensors)
    with tracing(TracingContext(fake_mode)), unmatchable_patterns_unregistered(graph_module, tensors):
        compiled: Callable[..., Any] = compile_fx(graph_module, fake, config_patches=config_patches)  # type: ignore[assignment]
    return compiled


# Inductor's joint-graph patterns (registered once per process, before its first joint-graph
# pass) each contain one of these ops (attention fusion, random indexing), or are registered or
# match for CUDA/XPU tensors only (matrix-product padding, float8 scale extraction).
_JOINT_PATTERN_OPS = ("softmax", "randperm")


@contextlib.contextmanager
def unmatchable_patterns_unregistered(graph_module: fx.GraphModule, tensors: Sequence[Any]) -> Iterator[None]:
    """Inductor's joint-graph patterns left unregistered while compiling a graph none of them can
    match: on CPU, with no softmax (attention fusion) and no randperm (index fusion).

    Registering them traces every pattern once per process and keeps the results: 12.6 MiB of
    Python objects (5,000 pattern nodes), measured on the CIFAR-10 CNN, that stayed resident
    through training (a ``torch.compile`` whose graphs come from AOTAutograd's cache skips the
    joint-graph pass, and them, altogether). The compiled code is the same either way. A later
    compile that can use them (a softmax, a GPU) registers them then."""
    try:
        from torch._inductor.fx_passes import joint_graph
    except ImportError:
        yield
        return
    on_cpu = all(t.device.type == "cpu" for t in tensors if isinstance(t, torch.Tensor))
    targets = (str(n.target) for m in graph_module.modules() if isinstance(m, fx.GraphModule)
               for n in m.graph.nodes if n.op == "call_function")
    if not on_cpu or not hasattr(joint_graph, "lazy_init") \
            or any(op in target for target in targets for op in _JOINT_PATTERN_OPS):
        yield
        return
    register = joint_graph.lazy_init
    joint_graph.lazy_init = lambda *args, **kwargs: None
    try:
        yield
    finally:
        joint_graph.lazy_init = register


class DirectGraph:
    """``graph_module`` compiled by Inductor without Dynamo on its first call with each layout of
    arguments (shapes, strides, dtypes, devices), then called directly, without recording
    autograd history (its caller differentiates through its own backward).

    A training step's forward is called once per physical batch with the same layouts; through
    ``torch.compile`` every call evaluated Dynamo's guards on every argument: 1.35 against 1.22 ms
    for the MLP's forward (8 arguments) at batch 256, and more for models with more parameters.
    ``keep_output_strides=False`` lets Inductor return outputs in the layout it computed them in
    (for a forward whose saved values go to a backward that accepts any strides).
    """

    def __init__(self, graph_module: fx.GraphModule, keep_output_strides: bool = True) -> None:
        self.graph_module = for_inductor(graph_module)
        self.config_patches: dict[str, Any] = {} if keep_output_strides else {"keep_output_stride": False}
        self.compiled: dict[tuple[Any, ...], Callable[..., Any]] = {}

    def __call__(self, *args: Any) -> Any:
        layout = _layout(args)
        with torch.no_grad():
            compiled = self.compiled.get(layout)
            if compiled is None:
                compiled = self.compiled[layout] = _compile_graph(self.graph_module, args, self.config_patches)
            return compiled(*args)


def _layout(args: Sequence[Any]) -> tuple[Any, ...]:
    return tuple((t.shape, t.stride(), t.dtype, t.device) if isinstance(t, torch.Tensor) else t for t in args)


def lower_split(graphs: SplitGraphs, backend: Backend = "inductor") -> tuple[Callable[..., Any], BoxedGraph, bool]:
    """The forward and the private backward of one split, lowered together.

    Inductor computes a convolution net's forward channels-last on CPU. When the backward
    accepts saved values of any strides, the forward hands them over in that layout instead of
    copying each back (and the backward's kernels run channels-last too; saved byte masks are
    stored, and unfilled shape tensors laid out, that way as well). The flag says the
    forward's outputs may come back in such a layout: the caller restores model outputs.
    Without convolutions Inductor keeps the traced layouts, and both graphs stay as they are.

    The backward is a :class:`BoxedGraph`: called with one list (saved values, then the rest of
    its inputs) that it empties, so each saved value is freed at its last use, as in
    AOTAutograd's backward. It may write into the saved values the forward computed
    (:func:`donatable_saved`): call it at most once per forward call, and hold no other
    reference to those values.
    """
    convolves = any(n.target is torch.ops.aten.convolution.default for n in graphs.forward.graph.nodes)
    any_strides = accepting_any_strides(graphs.backward) if backend == "inductor" and convolves else None
    if any_strides is not None:
        relaid_graphs = channels_last_masks_and_shapes(graphs)
        if relaid_graphs is not graphs:
            graphs, any_strides = relaid_graphs, accepting_any_strides(relaid_graphs.backward)
    relaid = any_strides is not None
    forward = DirectGraph(graphs.forward, keep_output_strides=not relaid) if backend == "inductor" \
        else lower(graphs.forward, backend)
    backward = any_strides or graphs.backward
    return forward, BoxedGraph(backward, backend, donated=donatable_saved(graphs)), relaid


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
