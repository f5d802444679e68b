"""Run a scenario on N local processes over gloo and loopback; never hang.

Every rank runs ``workers.<scenario>(rank, world_size, **kwargs)`` in a spawned process with its
own process group (60 s collective timeout). The parent collects each rank's result or error
and gives up after ``timeout`` seconds, killing whatever is left, so a failing or dead rank
makes the test fail instead of hanging the suite.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any


@dataclass
class RankResult:
    rank: int
    value: Any = None
    error: str | None = None  # "ExceptionType: message"
    error_type: str | None = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world: int, port: int, scenario: str, kwargs: dict[str, Any], results: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
        from tests.distributed import workers

        value = getattr(workers, scenario)(rank, world, **kwargs)
        results.put(RankResult(rank, value=value))
    except BaseException as error:  # reported to the parent, which decides
        results.put(RankResult(rank, error=f"{type(error).__name__}: {error}\n{traceback.format_exc()}",
                               error_type=type(error).__name__))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(scenario: str, world_size: int = 2, timeout: float = 180.0, **kwargs: Any) -> list[RankResult]:
    """Each rank's result, in rank order; raises TimeoutError if a rank does not report in time."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=_entry, args=(r, world_size, port, scenario, kwargs, results),
                                 daemon=True) for r in range(world_size)]
    for p in processes:
        p.start()
    collected: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(collected) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{scenario}: ranks {sorted(set(range(world_size)) - set(collected))} "
                                   f"did not report within {timeout:.0f} s")
            try:
                result = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if not p.is_alive() and r not in collected]
                # A rank that exited without reporting (os._exit, a crash) reports as such.
                for r in dead:
                    if processes[r].exitcode is not None:
                        try:
                            result = results.get(timeout=1.0)
                        except queue.Empty:
                            collected[r] = RankResult(r, error=f"exited with code {processes[r].exitcode}",
                                                      error_type="Exited")
                            continue
                        collected[result.rank] = result
                continue
            collected[result.rank] = result
    finally:
        for p in processes:
            p.join(timeout=10)
        for p in processes:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    return [collected[r] for r in range(world_size)]


def values(results: list[RankResult]) -> list[Any]:
    """Every rank's value; fails with the ranks' errors if any rank failed."""
    errors = [f"rank {r.rank}: {r.error}" for r in results if r.error is not None]
    if errors:
        raise AssertionError("\n".join(errors))
    return [r.value for r in results]
