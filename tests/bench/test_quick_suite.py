"""The benchmark's quick mode runs end to end, so the benchmark itself cannot rot."""

import json

import pytest

from bench import run
from bench.systems import ALL_SYSTEMS


@pytest.mark.slow
def test_quick_suite_writes_results(tmp_path):
    assert run.main(["--quick", "--out", str(tmp_path)]) == 0
    report = (tmp_path / "RESULTS.md").read_text()
    data = json.loads((tmp_path / "results.json").read_text())
    assert "## End-to-end models" in report and "## Single layers" in report
    assert (tmp_path / "plots" / "models.png").stat().st_size > 0
    for cell in data["cells"]:
        results = cell["results"]
        for system in ALL_SYSTEMS:
            if system == "vmap" and cell["workload"] == "lstm":
                continue  # torch.func.vmap cannot batch nn.LSTM: reported, not run
            assert "step_s" in results[system], (cell["workload"], system, results[system])
            assert results[system]["step_s"] > 0
        assert results["dpcompile"]["graphs"] >= 1
    first = data["cells"][0]
    assert first["memory"]["dpcompile"]["peak_bytes"] > 0


def test_live_memory_takes_a_step_apart(capsys):
    from bench import live_memory

    assert live_memory.main(["mlp", "dpcompile", "--quick", "--batch", "64", "--blocks", "0"]) == 0
    out = capsys.readouterr().out
    peak = float(out.split("during a step ")[1].split(" MiB")[0])
    assert peak > 0
    assert "MiB  " in out and "in allocation order" in out


def test_report_names_the_machine_of_merged_sections(tmp_path):
    cell = {
        "workload": "linear",
        "batch": 16,
        "results": {"compiled": {"step_s": 1e-3, "compile_s": 1.0, "graphs": 1}},
    }
    data = {
        "date": "2026-12-03",
        "machine": "new machine",
        "systems": ["compiled"],
        "notes": "",
        "cells": [
            dict(cell, kind="models", machine="new machine", date="2026-12-03"),
            dict(cell, kind="layers", machine="old machine", date="2026-12-02"),
        ],
    }
    report = run.write_report(data, tmp_path, quick=True).read_text()
    models, layers = report.split("## Single layers")
    assert "Measured on" not in models
    assert "Measured on old machine, 2026-12-02." in layers
    assert "Peak memory measured on" not in report  # no cell has memory

    # Memory re-measured (--memory-only) on another machine than the timings: both are named.
    data["cells"][0]["memory"] = {"compiled": {"peak_bytes": 1}}
    data["cells"][0].update(memory_machine="third machine", memory_date="2026-12-04")
    data["cells"][1]["memory"] = {"compiled": {"peak_bytes": 1}}
    report = run.write_report(data, tmp_path, quick=True).read_text()
    models, layers = report.split("## Single layers")
    assert "Measured on" not in models
    assert "Peak memory measured on third machine, 2026-12-04." in models
    assert "Peak memory measured on" not in layers  # memory and timings from the same run

    # A section with cells from two runs says which workloads each run measured.
    data["cells"].append(dict(cell, workload="lstm", kind="layers", machine="new machine", date="2026-12-03"))
    layers = run.write_report(data, tmp_path, quick=True).read_text().split("## Single layers")[1]
    assert "Measured on new machine, 2026-12-03: lstm." in layers
    assert "Measured on old machine, 2026-12-02: linear." in layers
