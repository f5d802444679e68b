"""Run the benchmark suite and write bench/RESULTS.md with plots.

    python bench/run.py                  # the full suite (about an hour on 2 CPU cores)
    python bench/run.py --quick          # seconds: tiny workloads, cheap backends (run by the tests)
    python bench/run.py --only models    # or --only layers; --systems dpcompile compiled ...

For each workload and batch size, every system is prepared in one process and their steps are
timed with interleaved repetitions (system A, B, C, A, B, C, ...); the table reports medians as
ratios to the non-private ``torch.compile`` step. Peak memory is measured per system in a fresh
subprocess (the high-water mark of resident memory during training steps, minus the process's
footprint before the model was built and after the system's library was imported) and reported
as a ratio to the same baseline. Compile time is the time to build the system plus its first step, with a cold Inductor cache unless
``--warm-cache``. Graph counts run a Poisson epoch's batch sizes through each system's compiler
(Dynamo with a counting backend, dpcompile with its eager backend).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from bench.systems import ALL_SYSTEMS, BASELINE, Unavailable, import_libraries, prepare  # noqa: E402
from bench.workloads import Workload, layers, models  # noqa: E402
from dpcompile.engine import release_free_heap  # noqa: E402

LAYER_BATCHES = [16, 64, 256, 512]
MODEL_BATCH = 256


def poisson_sizes(workload: Workload, batch: int, steps: int, seed: int = 0) -> list[int]:
    """Batch sizes of ``steps`` Poisson steps at q = batch / N."""
    q = batch / workload.dataset_size
    g = torch.Generator().manual_seed(seed)
    return [int((torch.rand(workload.dataset_size, generator=g) < q).sum()) for _ in range(steps)]


def time_interleaved(steps: dict[str, Any], repeats: int) -> dict[str, float]:
    """Median seconds per step for each system, repetitions interleaved across systems."""
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def measure_cell(workload: Workload, batch: int, systems: list[str], quick: bool, repeats: int,
                 epoch_steps: int, progress: Any) -> dict[str, dict[str, Any]]:
    prepared, results = {}, {}
    for system in systems:
        progress.set_postfix_str(f"{workload.name} B={batch} {system}")
        try:
            prepared[system] = prepare(system, workload, batch, quick)
            results[system] = {"compile_s": prepared[system].compile_seconds}
        except Unavailable as error:
            results[system] = {"error": str(error)}
        except Exception as error:  # a system that cannot run this workload is reported, not fatal
            results[system] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
    # one warm-up step each, then interleaved timing
    for p in prepared.values():
        p.step()
    times = time_interleaved({s: p.step for s, p in prepared.items()}, repeats)
    for system, seconds in times.items():
        results[system]["step_s"] = seconds
    sizes = poisson_sizes(workload, batch, epoch_steps)
    for system, p in prepared.items():
        progress.set_postfix_str(f"{workload.name} B={batch} {system} graphs")
        try:
            results[system]["graphs"] = p.graph_count(sizes)
        except Exception as error:
            results[system]["graphs_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    results["_epoch"] = {"steps": len(sizes), "distinct_sizes": len(set(sizes))}
    return results


# ---- memory, one subprocess per system ---------------------------------------------------


def _rss_high_water() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_high_water() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(workload_name: str, kind: str, batch: int, system: str, quick: bool) -> dict[str, Any]:
    workload = next(w for w in (models(quick) if kind == "model" else layers(quick)) if w.name == workload_name)
    import_libraries(system)  # library imports are footprint, for every system alike
    base = _rss()
    try:
        p = prepare(system, workload, batch, quick)
    except Exception as error:
        return {"error": str(error)[:200]}
    p.step()
    # Every system compiles (or traces) in its first step; glibc keeps the heap that compiling
    # freed, which would count as training memory. Return it to the OS for every system alike.
    release_free_heap()
    if not _reset_high_water():
        return {"error": "no /proc/self/clear_refs"}
    for _ in range(2):
        p.step()
    return {"peak_bytes": _rss_high_water() - base}


def measure_memory(workload: Workload, batch: int, systems: list[str], quick: bool, env: dict[str, str]) -> dict[str, Any]:
    out = {}
    for system in systems:
        cmd = [sys.executable, str(HERE / "run.py"), "--memory-child",
               json.dumps([workload.name, workload.kind, batch, system, quick])]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        try:
            out[system] = json.loads(proc.stdout.strip().splitlines()[-1])
        except (IndexError, json.JSONDecodeError):
            out[system] = {"error": (proc.stderr or "no output").strip().splitlines()[-1][:200]}
    return out


# ---- report ------------------------------------------------------------------------------


def _ratio(results: dict[str, Any], system: str, key: str) -> float | None:
    base = results.get(BASELINE, {}).get(key)
    value = results.get(system, {}).get(key)
    if base is None or value is None or base <= 0:
        return None
    return value / base


def _fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = names[0]
    except OSError:
        pass
    versions = [f"torch {torch.__version__}"]
    try:
        import opacus

        versions.append(f"opacus {opacus.__version__}")
    except ImportError:
        versions.append("opacus not installed")
    import dpcompile

    versions.append(f"dpcompile {dpcompile.__version__}")
    return (f"{cpu}, {os.cpu_count()} CPU threads visible, torch threads {torch.get_num_threads()}, "
            f"Python {platform.python_version()}, {', '.join(versions)}")


def _origin(cell: dict[str, Any], default: tuple[str, str], prefix: str = "") -> tuple[str, str]:
    """(machine, date) a cell's timings (or, with ``prefix="memory_"``, its peak memory) were
    measured on: a memory re-measure records its own, otherwise the cell's, else the run's."""
    machine = cell.get(f"{prefix}machine", cell.get("machine", default[0]))
    return machine, cell.get(f"{prefix}date", cell.get("date", default[1]))


def _workloads_by_origin(cells: list[dict[str, Any]], default: tuple[str, str],
                         prefix: str = "") -> dict[tuple[str, str], list[str]]:
    """The workloads of ``cells`` grouped by the (machine, date) they were measured on."""
    groups: dict[tuple[str, str], list[str]] = {}
    for cell in cells:
        names = groups.setdefault(_origin(cell, default, prefix), [])
        if cell["workload"] not in names:
            names.append(cell["workload"])
    return dict(sorted(groups.items()))


def _origin_lines(label: str, origins: dict[tuple[str, str], list[str]]) -> list[str]:
    """One line per origin; with more than one, each names its workloads."""
    if len(origins) == 1:
        return [f"{label} {machine}, {date}." for machine, date in origins]
    return [f"{label} {machine}, {date}: {', '.join(names)}." for (machine, date), names in origins.items()]


def write_report(data: dict[str, Any], out_dir: Path, quick: bool) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = [
        "# dpcompile benchmarks",
        "",
        f"Generated by `python bench/run.py{' --quick' if quick else ''}` on {data['date']}.",
        "",
        f"Machine: {data['machine']}.",
        "",
        "Step time: one full training step (forward, backward, per-sample clipping, noise, optimizer",
        "update; the non-private systems skip clipping and noise), median of interleaved repetitions,",
        f"as a ratio to the non-private `torch.compile` step (`{BASELINE}`). Memory: peak resident memory",
        "during training steps as a ratio to the same baseline. Compile: seconds to build the system",
        "and run its first step (cold Inductor cache). Graphs: compiled graphs over a Poisson epoch's",
        "batch sizes. σ = 1, C = 1 for every private system.",
        "",
    ]
    systems = data["systems"]
    for section, title in (("models", "End-to-end models"), ("layers", "Single layers (Opacus paper, Figure 2)")):
        cells = [c for c in data["cells"] if c["kind"] == section]
        if not cells:
            continue
        lines += [f"## {title}", ""]
        # Sections merged from separate runs, or whose memory was re-measured (--memory-only),
        # say where and when their cells were measured.
        header_origin = (data["machine"], data["date"])
        step_origins = _workloads_by_origin(cells, header_origin)
        memory_origins = _workloads_by_origin([c for c in cells if "memory" in c], header_origin, "memory_")
        if list(step_origins) != [header_origin]:
            lines += _origin_lines("Measured on", step_origins) + [""]
        if memory_origins and set(memory_origins) != set(step_origins):
            lines += _origin_lines("Peak memory measured on", memory_origins) + [""]
        header = "| workload | B | " + " | ".join(f"{s} step" for s in systems) + " | " + \
            " | ".join(f"{s} mem" for s in systems if s != BASELINE) + " |"
        lines += [header, "|" + "---|" * (2 + len(systems) + len(systems) - 1)]
        for cell in cells:
            r = cell["results"]
            steps = []
            for s in systems:
                if "error" in r.get(s, {}):
                    steps.append("n/a")
                elif s == BASELINE:
                    steps.append(f"1 ({1e3 * r[s]['step_s']:.1f} ms)" if "step_s" in r[s] else "—")
                else:
                    steps.append(_fmt(_ratio(r, s, "step_s")))
            mems = []
            mem = cell.get("memory", {})
            for s in systems:
                if s == BASELINE:
                    continue
                base = mem.get(BASELINE, {}).get("peak_bytes")
                value = mem.get(s, {}).get("peak_bytes")
                mems.append(_fmt(value / base if base and value is not None else None))
            lines.append(f"| {cell['workload']} | {cell['batch']} | " + " | ".join(steps) + " | " + " | ".join(mems) + " |")
        lines += ["", "Compile seconds and compiled graphs over a Poisson epoch:", ""]
        lines += ["| workload | B | epoch steps | distinct sizes | " + " | ".join(f"{s}" for s in systems) + " |",
                  "|" + "---|" * (4 + len(systems))]
        for cell in cells:
            r = cell["results"]
            parts = []
            for s in systems:
                x = r.get(s, {})
                if "error" in x:
                    parts.append("n/a")
                    continue
                if not x:  # a system this cell was measured without
                    parts.append("—")
                    continue
                graphs = x.get("graphs")
                parts.append(f"{x.get('compile_s', 0):.1f} s / {graphs if graphs is not None else '?'}")
            epoch = r.get("_epoch", {})
            lines.append(f"| {cell['workload']} | {cell['batch']} | {epoch.get('steps', '')} | "
                         f"{epoch.get('distinct_sizes', '')} | " + " | ".join(parts) + " |")
        errors = [(c["workload"], c["batch"], s, c["results"][s]["error"]) for c in cells for s in systems
                  if "error" in c["results"].get(s, {})]
        if errors:
            lines += ["", "Not run:", ""] + [f"- {w} B={b} {s}: {e}" for w, b, s, e in errors]
        lines.append("")
    plots = make_plots(data, out_dir)
    if plots:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.relative_to(out_dir).as_posix()})" for p in plots] + [""]
    if data.get("notes"):
        lines += ["## Notes", "", data["notes"], ""]
    path = out_dir / "RESULTS.md"
    path.write_text("\n".join(lines))
    save_results(data, out_dir)
    return path


def save_results(data: dict[str, Any], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(data, indent=1))


def make_plots(data: dict[str, Any], out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    plots_dir = out_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    paths = []
    systems = [s for s in data["systems"] if s != BASELINE]
    model_cells = [c for c in data["cells"] if c["kind"] == "models"]
    if model_cells:
        fig, ax = plt.subplots(figsize=(9, 4))
        width = 0.8 / max(len(systems), 1)
        for k, s in enumerate(systems):
            values = [_ratio(c["results"], s, "step_s") or 0 for c in model_cells]
            ax.bar([i + k * width for i in range(len(model_cells))], values, width, label=s)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(systems) - 1) / 2 for i in range(len(model_cells))])
        ax.set_xticklabels([c["workload"] for c in model_cells])
        ax.set_yscale("log")
        ax.set_ylabel("step time / non-private compiled")
        ax.legend(fontsize=8)
        ax.set_title(f"End-to-end models, batch {model_cells[0]['batch']}")
        fig.tight_layout()
        path = plots_dir / "models.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    layer_cells = [c for c in data["cells"] if c["kind"] == "layers"]
    names = sorted({c["workload"] for c in layer_cells}, key=[c["workload"] for c in layer_cells].index)
    if names:
        cols = 4
        rows = -(-len(names) // cols)
        fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
        for ax, name in zip(axes.flat, names):
            cells = sorted((c for c in layer_cells if c["workload"] == name), key=lambda c: c["batch"])
            for s in systems:
                pts = [(c["batch"], _ratio(c["results"], s, "step_s")) for c in cells]
                pts = [(b, r) for b, r in pts if r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=s)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(name, fontsize=9)
        for ax in list(axes.flat)[len(names):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=6)
        fig.supylabel("step / non-private compiled")
        fig.supxlabel("batch size")
        fig.tight_layout()
        path = plots_dir / "layers.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def _rewrite_report(data: dict[str, Any], args: argparse.Namespace) -> int:
    """Write RESULTS.md and plots from earlier measurements (with new notes, if given)."""
    if args.notes:
        data["notes"] = args.notes.read_text()
    print(f"wrote {write_report(data, args.out, args.quick)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny workloads, cheap backends: seconds")
    parser.add_argument("--only", choices=["models", "layers"], help="run one section")
    parser.add_argument("--systems", nargs="+", default=ALL_SYSTEMS, choices=ALL_SYSTEMS)
    parser.add_argument("--workloads", nargs="+", help="names of workloads to run (default: all)")
    parser.add_argument("--batches", type=int, nargs="+", help="layer batch sizes (default 16 64 256 512)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repetitions per system")
    parser.add_argument("--epoch-steps", type=int, default=None, help="Poisson steps for graph counts")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="keep Inductor's on-disk cache")
    parser.add_argument("--out", type=Path, default=HERE, help="where RESULTS.md and plots/ go")
    parser.add_argument("--notes", type=Path, help="a Markdown file appended to RESULTS.md")
    parser.add_argument("--report-only", type=Path, metavar="RESULTS_JSON",
                        help="rewrite RESULTS.md and plots from a results.json (with --notes) without measuring")
    parser.add_argument("--memory-only", type=Path, metavar="RESULTS_JSON",
                        help="re-measure only peak memory for the selected cells of a results.json, "
                             "keep its timings, and rewrite the report")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(*json.loads(args.memory_child))))
        return 0
    if args.report_only:
        return _rewrite_report(json.loads(args.report_only.read_text()), args)

    import warnings

    from tqdm import tqdm

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    warnings.filterwarnings("ignore", message="Secure RNG turned off")

    quick = args.quick
    repeats = args.repeats or (2 if quick else 9)
    epoch_steps = args.epoch_steps or (4 if quick else 60)
    systems = list(dict.fromkeys([BASELINE, *args.systems]))
    env = dict(os.environ)
    cache = None
    if not args.warm_cache and not quick:
        cache = tempfile.TemporaryDirectory(prefix="dpcompile-bench-inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = env["TORCHINDUCTOR_CACHE_DIR"] = cache.name
    plan: list[tuple[Workload, int, str]] = []
    if args.only in (None, "models"):
        plan += [(w, 8 if quick else MODEL_BATCH, "models") for w in models(quick)]
    if args.only in (None, "layers"):
        batches = args.batches or ([4] if quick else LAYER_BATCHES)
        plan += [(w, b, "layers") for w in layers(quick) for b in batches]
    if args.workloads:
        plan = [p for p in plan if p[0].name in args.workloads]
    if args.memory_only:
        data = json.loads(args.memory_only.read_text())
        cells = {(c["workload"], c["batch"]): c for c in data["cells"]}
        for workload, batch, _ in tqdm(plan, desc="memory", unit="cell"):
            cell = cells[(workload.name, batch)]
            measured = [s for s in systems if s in data["systems"]]
            cell.setdefault("memory", {}).update(measure_memory(workload, batch, measured, quick, env))
            cell["memory_machine"], cell["memory_date"] = machine_description(), datetime.date.today().isoformat()
        return _rewrite_report(data, args)
    data: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_description(),
        "systems": systems,
        "cells": [],
        "notes": args.notes.read_text() if args.notes else "",
    }
    progress = tqdm(plan, desc="benchmark", unit="cell")
    for k, (workload, batch, kind) in enumerate(progress):
        results = measure_cell(workload, batch, systems, quick, repeats, epoch_steps, progress)
        cell = {"workload": workload.name, "kind": kind, "batch": batch, "note": workload.note,
                "machine": data["machine"], "date": data["date"], "results": results}
        # Quick mode measures memory once (baseline and dpcompile) just to exercise the path.
        if not args.no_memory and (not quick or k == 0):
            progress.set_postfix_str(f"{workload.name} B={batch} memory")
            measured = systems if not quick else [BASELINE, "dpcompile"]
            cell["memory"] = measure_memory(workload, batch, [s for s in measured if s in systems], quick, env)
        data["cells"].append(cell)
        save_results(data, args.out)  # a full run takes hours: a stopped one keeps what it measured
    path = write_report(data, args.out, quick)
    print(f"wrote {path}")
    if cache is not None:
        cache.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
