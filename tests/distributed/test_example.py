"""The README's distributed launch: the digits job under torchrun on 2 processes."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_digits_runs_under_torchrun_with_two_processes() -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "dpcompile", "digits", "--epochs", "1", "--backend", "eager"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "64 per rank on 2 ranks" in done.stdout
    # Only rank 0 prints the summary.
    assert done.stdout.count("| dpcompile |") == 1
    assert "compiled graph pairs" in done.stdout
