"""Which tensors are live at the peak of one training step, grouped by the op that allocated them.

    python bench/live_memory.py cifar10_cnn dpcompile     # a workload of bench/workloads.py, a system
    python bench/live_memory.py cifar10_cnn compiled --blocks 1   # also list blocks of ≥ 1 MiB

The benchmark's memory column is resident memory (compiled code, the compiler, glibc's heap);
this counts only the tensor memory allocated during one step (after two warm-up steps), from
the profiler's allocation events, so a step's peak can be taken apart: what each graph, kernel
and extern op holds at the moment the most is live. Used to find the unfolded windows Inductor
hoisted to the start of the CIFAR-10 private backward (see RESULTS.md).
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path
from typing import Any

from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import systems, workloads  # noqa: E402

MiB = 2**20


def step_allocations(step: Any) -> list[tuple[int, int, int, tuple[str, ...]]]:
    """(time, address, bytes (negative: a free), enclosing op names) of every host allocation
    (the benchmark's systems run on the CPU)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events: list[tuple[int, int, int, tuple[str, ...]]] = []

    def walk(event: Any, path: tuple[str, ...]) -> None:
        fields = event.extra_fields
        if type(fields).__name__ == "_ExtraFields_Allocation" and fields.device.type == "cpu":
            events.append((event.start_time_ns, fields.ptr, fields.alloc_size, path))
        for child in event.children:
            walk(child, (*path, event.name))

    for root in prof.profiler.kineto_results.experimental_event_tree():  # type: ignore[union-attr]
        walk(root, ())
    return sorted(events, key=lambda e: e[0])


def live_at_peak(events: list[tuple[int, int, int, tuple[str, ...]]]) -> tuple[int, dict[int, tuple[int, tuple[str, ...], int]]]:
    """The peak of live bytes allocated during the step, and the blocks live then (address →
    bytes, allocating ops, allocation index)."""
    live: dict[int, tuple[int, tuple[str, ...], int]] = {}
    current = peak = 0
    at_peak: dict[int, tuple[int, tuple[str, ...], int]] = {}
    for k, (_, address, size, path) in enumerate(events):
        if size > 0:
            live[address] = (size, path, k)
            current += size
        elif address in live:
            current -= live.pop(address)[0]
        if current > peak:
            peak, at_peak = current, dict(live)
    return peak, at_peak


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload")
    parser.add_argument("system", choices=systems.ALL_SYSTEMS)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="the quick suite's workloads and backends")
    parser.add_argument("--blocks", type=float, default=None, help="also list live blocks of at least this many MiB")
    args = parser.parse_args(argv)
    catalog = {w.name: w for w in workloads.models(args.quick) + workloads.layers(args.quick)}
    prepared = systems.prepare(args.system, catalog[args.workload], args.batch, args.quick)
    for _ in range(2):
        prepared.step()
    peak, blocks = live_at_peak(step_allocations(prepared.step))
    print(f"{args.workload} {args.system} B={args.batch}: peak of tensor memory allocated during a step "
          f"{peak / MiB:.3f} MiB")
    by_op: collections.Counter[str] = collections.Counter()
    for size, path, _ in blocks.values():
        by_op[" > ".join(name[:60] for name in path[-3:])] += size
    for where, size in by_op.most_common(15):
        print(f"  {size / MiB:8.2f} MiB  {where}")
    if args.blocks is not None:
        print(f"blocks of at least {args.blocks} MiB, in allocation order:")
        for size, path, k in sorted(blocks.values(), key=lambda b: b[2]):
            if size >= args.blocks * MiB:
                print(f"  #{k:<5d} {size / MiB:8.2f} MiB  {' > '.join(name[:60] for name in path[-3:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
