"""Benchmark of dpcompile.accounting: run ``python bench/accounting.py`` (prints Markdown).

Times ε for 100k steps (RDP, PRV at eps_error 0.01 and 0.1, GDP), the per-step cost of
``step`` + ``epsilon`` with RDP, and noise calibration. Opacus 1.6 is timed alongside when it is
installed (reference only: dpcompile does not use it). Each figure is the best of a few runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections.abc import Callable

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dpcompile.accounting import (  # noqa: E402
    AccountingWarning,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    get_noise_multiplier,
)

SIGMA, Q, STEPS, DELTA = 1.1, 0.004, 100_000, 1e-5


def best_of(fn: Callable[[], object], repeat: int) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - t0)
    return best, value


def fresh_epsilon(cls: Callable[..., object], **kwargs: object) -> Callable[[], float]:
    def run() -> float:
        acc = cls(**kwargs)
        acc.step(SIGMA, Q, STEPS)  # type: ignore[attr-defined]
        return acc.epsilon(DELTA)  # type: ignore[attr-defined]
    return run


def per_step_rdp(n: int) -> Callable[[], float]:
    def run() -> float:
        acc = RDPAccountant()
        eps = 0.0
        for _ in range(n):
            acc.step(SIGMA, Q)
            eps = acc.epsilon(DELTA)
        return eps
    return run


def opacus_rows(repeat: int) -> list[tuple[str, float, str]]:
    try:
        from opacus.accountants import PRVAccountant as OPRV
        from opacus.accountants import RDPAccountant as ORDP
        from opacus.accountants.utils import get_noise_multiplier as o_noise
    except ImportError:
        return []
    rows = []
    for name, cls in (("RDP", ORDP), ("PRV (eps_error 0.01)", OPRV)):
        def run(cls=cls) -> float:
            acc = cls()
            acc.history = [(SIGMA, Q, STEPS)]
            return acc.get_epsilon(DELTA)
        try:
            t, v = best_of(run, repeat)
            rows.append((f"Opacus 1.6 {name}, epsilon, 100k steps", t, f"{v:.4f}"))
        except Exception as err:  # report, do not fail the benchmark
            rows.append((f"Opacus 1.6 {name}, epsilon, 100k steps", float("nan"), repr(err)[:60]))
    for acc in ("rdp", "prv"):
        t, v = best_of(lambda acc=acc: o_noise(target_epsilon=3.0, target_delta=DELTA,
                                                sample_rate=Q, epochs=60, accountant=acc), 1)
        rows.append((f"Opacus 1.6 noise, {acc}, eps 3, 60 epochs", t, f"sigma {v:.4f}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-opacus", action="store_true")
    args = parser.parse_args()
    warnings.simplefilter("ignore", AccountingWarning)
    warnings.filterwarnings("ignore", message="Optimal order is the")  # Opacus' edge warning
    r = args.repeat
    rows: list[tuple[str, float, str]] = []
    for label, fn in [
        ("RDP, epsilon, 100k steps (new sigma, q)", fresh_epsilon(RDPAccountant)),
        ("PRV eps_error 0.01, epsilon, 100k steps", fresh_epsilon(PRVAccountant, eps_error=0.01)),
        ("PRV eps_error 0.1, epsilon, 100k steps", fresh_epsilon(PRVAccountant, eps_error=0.1)),
        ("GDP, epsilon, 100k steps", fresh_epsilon(GDPAccountant)),
    ]:
        t, v = best_of(fn, r)
        rows.append((label, t, f"{v:.4f}"))
    t, v = best_of(per_step_rdp(10_000), 1)
    rows.append(("RDP, step() + epsilon() every step, per step", t / 10_000, f"{v:.4f} after 10k"))
    for acc, kw in (("rdp", {}), ("prv", {}), ("gdp", {})):
        t, v = best_of(lambda acc=acc, kw=kw: get_noise_multiplier(
            3.0, DELTA, Q, epochs=60, accountant=acc, **kw), 1)
        rows.append((f"noise, {acc}, eps 3, 60 epochs (15k steps)", t, f"sigma {v:.4f}"))
    t, v = best_of(lambda: get_noise_multiplier(8.0, DELTA, Q, steps=STEPS, accountant="prv"), 1)
    rows.append(("noise, prv, eps 8, 100k steps", t, f"sigma {v:.4f}"))
    if not args.no_opacus:
        rows.extend(opacus_rows(r))

    print(f"sigma={SIGMA}, q={Q}, delta={DELTA}; {os.cpu_count()} CPUs; best of {r}\n")
    print("| task | time | result |")
    print("|---|---:|---|")
    for label, t, v in rows:
        shown = f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"
        if t < 1e-3:
            shown = f"{t * 1e6:.0f} µs"
        print(f"| {label} | {shown} | {v} |")


if __name__ == "__main__":
    main()
