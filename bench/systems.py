"""The systems compared: each prepares one full training step (forward, backward, clipping,
noise, optimizer update) for a workload and batch size.

- ``eager``: non-private, plain PyTorch.
- ``compiled``: non-private, ``torch.compile`` (the baseline every ratio is taken against).
- ``opacus_hooks`` / ``opacus_ghost``: Opacus 1.6 (optional dependency), its two fast modes.
- ``vmap``: per-sample gradients with ``torch.func.vmap(grad(...))`` under ``torch.compile``,
  clipping, noise and the update written by hand (what a JAX-style user would do).
- ``dpcompile``: ``dpcompile.dp_compile``.
- ``dpcompile_low_memory``: the same with ``low_memory=True`` (clipped sums from a second backward).

Private systems use σ=1, C=1 and the same expected batch size. In quick mode compiled systems
use cheap backends (Dynamo without Inductor, dpcompile's eager graphs) so the suite runs in
seconds and still exercises every code path.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.workloads import Workload

SIGMA = 1.0
CLIP = 1.0

ALL_SYSTEMS = ["eager", "compiled", "opacus_hooks", "opacus_ghost", "vmap", "dpcompile", "dpcompile_low_memory"]
BASELINE = "compiled"


@dataclass
class Prepared:
    """A ready-to-time training step."""

    step: Callable[[], Any]
    setup_seconds: float = 0.0  # building the private/compiled objects, before the first step
    first_step_seconds: float = 0.0  # the first step (includes lazy compilation)
    graph_count: Callable[[list[int]], int | None] = field(default=lambda sizes: None)

    @property
    def compile_seconds(self) -> float:
        return self.setup_seconds + self.first_step_seconds


class Unavailable(Exception):
    """The system cannot run here (a missing optional dependency, an unsupported model)."""


def _loader(workload: Workload, batch_size: int) -> DataLoader:
    x, y = workload.batch(batch_size, seed=1)
    # The dataset only fixes the sample rate q = batch_size / dataset_size; steps use `batch`.
    reps = max(1, -(-workload.dataset_size // batch_size))
    data = TensorDataset(x.repeat(reps, *([1] * (x.dim() - 1)))[: workload.dataset_size], y.repeat(reps)[: workload.dataset_size])
    return DataLoader(data, batch_size=batch_size)


def _timed_first(step: Callable[[], Any]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def import_libraries(system: str) -> None:
    """Import the library a system's setup imports (Opacus and the scipy parts its accountants
    load; dpcompile and torch come with the benchmark itself), so that a memory measurement taken
    after this counts no system's import footprint as training memory."""
    if system.startswith("opacus"):
        try:
            import opacus  # noqa: F401
            from opacus.validators import ModuleValidator  # noqa: F401
        except ImportError:
            pass  # prepare reports it


def prepare(system: str, workload: Workload, batch_size: int, quick: bool = False) -> Prepared:
    torch.manual_seed(0)
    model = workload.build()
    x, y = workload.batch(batch_size)
    return {
        "eager": _eager,
        "compiled": _compiled,
        "opacus_hooks": _opacus("hooks"),
        "opacus_ghost": _opacus("ghost"),
        "vmap": _vmap,
        "dpcompile": _dpcompile,
        "dpcompile_low_memory": _dpcompile_low_memory,
    }[system](model, workload, x, y, batch_size, quick)


def _plain_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    def step() -> Any:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return step


def _eager(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int, quick: bool) -> Prepared:
    step = _plain_step(model, torch.optim.SGD(model.parameters(), lr=0.01), x, y)
    return Prepared(step, 0.0, _timed_first(step), lambda sizes: 0)


def _compile_backend(quick: bool) -> str:
    return "eager" if quick else "inductor"


def _count_graphs(make: Callable[[Callable[..., Any]], Callable[[torch.Tensor, torch.Tensor], Any]],
                  workload: Workload, sizes: list[int]) -> int:
    """Graphs torch.compile produces over batches of the given sizes (counted, not compiled)."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    run = make(counter)
    for k, size in enumerate(sizes):
        if size == 0:
            continue
        x, y = workload.batch(size, seed=k)
        run(x, y)
    torch._dynamo.reset()
    return int(counter.frame_count)


def _compiled(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int, quick: bool) -> Prepared:
    start = time.perf_counter()
    compiled = torch.compile(model, backend=_compile_backend(quick))
    setup = time.perf_counter() - start
    step = _plain_step(compiled, torch.optim.SGD(model.parameters(), lr=0.01), x, y)

    def graphs(sizes: list[int]) -> int:
        def make(backend: Callable[..., Any]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
            counted = torch.compile(copy.deepcopy(model), backend=backend)
            return lambda bx, by: F.cross_entropy(counted(bx), by).backward()

        return _count_graphs(make, workload, sizes)

    return Prepared(step, setup, _timed_first(step), graphs)


def _opacus(mode: str) -> Callable[..., Prepared]:
    def prepare_opacus(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int, quick: bool) -> Prepared:
        try:
            import opacus
            from opacus.validators import ModuleValidator
        except ImportError as error:
            raise Unavailable("opacus is not installed (pip install 'dpcompile[bench]')") from error
        import warnings

        warnings.filterwarnings("ignore", module="opacus")
        start = time.perf_counter()
        model = ModuleValidator.fix(model)  # nn.LSTM -> DPLSTM, MultiheadAttention -> DPMultiheadAttention
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        engine = opacus.PrivacyEngine(accountant="rdp")
        criterion = nn.CrossEntropyLoss()
        out = engine.make_private(
            module=model, optimizer=optimizer, data_loader=_loader(workload, batch), noise_multiplier=SIGMA,
            max_grad_norm=CLIP, grad_sample_mode=mode, criterion=criterion, poisson_sampling=True,
        )
        private, private_optimizer = out[0], out[1]
        loss_fn = out[2] if mode == "ghost" else criterion
        setup = time.perf_counter() - start

        def step() -> Any:
            private_optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(private(x), y)
            loss.backward()
            private_optimizer.step()
            return loss

        return Prepared(step, setup, _timed_first(step), lambda sizes: 0)

    return prepare_opacus


def _vmap(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int, quick: bool) -> Prepared:
    from torch.func import functional_call, grad, vmap

    params = {n: p for n, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    expected = batch

    def sample_loss(p: dict[str, torch.Tensor], xs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (xs.unsqueeze(0),))
        return F.cross_entropy(out, ys.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))

    def clipped_sum(p: dict[str, torch.Tensor], bx: torch.Tensor, by: torch.Tensor) -> dict[str, torch.Tensor]:
        grads = per_sample(p, bx, by)
        norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
        factors = (CLIP / (norms + 1e-6)).clamp(max=1.0)
        return {n: torch.einsum("b,b...->...", factors, g) for n, g in grads.items()}

    start = time.perf_counter()
    compiled = torch.compile(clipped_sum, backend=_compile_backend(quick))
    setup = time.perf_counter() - start

    def step() -> Any:
        detached = {n: p.detach() for n, p in params.items()}
        sums = compiled(detached, x, y)
        for n, p in params.items():
            p.grad = (sums[n] + SIGMA * CLIP * torch.randn_like(p)) / expected
        optimizer.step()

    def graphs(sizes: list[int]) -> int:
        def make(backend: Callable[..., Any]) -> Callable[[torch.Tensor, torch.Tensor], Any]:
            counted = torch.compile(clipped_sum, backend=backend)
            return lambda bx, by: counted({n: p.detach() for n, p in params.items()}, bx, by)

        return _count_graphs(make, workload, sizes)

    return Prepared(step, setup, _timed_first(step), graphs)


def _dpcompile(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int, quick: bool,
               low_memory: bool = False) -> Prepared:
    import dpcompile

    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    backend = "eager" if quick else "inductor"
    start = time.perf_counter()
    private, private_optimizer, _ = dpcompile.dp_compile(
        model, optimizer, _loader(workload, batch), noise_multiplier=SIGMA, max_grad_norm=CLIP, backend=backend,
        low_memory=low_memory,
    )
    setup = time.perf_counter() - start
    step = _plain_step(private, private_optimizer, x, y)

    def graphs(sizes: list[int]) -> int:
        """Graph pairs dp_compile builds over the epoch's batches (traced, run eagerly)."""
        clone = workload.build()
        counted, counted_optimizer, _ = dpcompile.dp_compile(
            clone, torch.optim.SGD(clone.parameters(), lr=0.01), _loader(workload, batch),
            noise_multiplier=SIGMA, max_grad_norm=CLIP, backend="eager", low_memory=low_memory,
        )
        for k, size in enumerate(sizes):
            bx, by = workload.batch(size, seed=k)
            _plain_step(counted, counted_optimizer, bx, by)()
        return counted.compiled_graph_count

    return Prepared(step, setup, _timed_first(step), graphs)


def _dpcompile_low_memory(model: nn.Module, workload: Workload, x: torch.Tensor, y: torch.Tensor, batch: int,
                          quick: bool) -> Prepared:
    return _dpcompile(model, workload, x, y, batch, quick, low_memory=True)
