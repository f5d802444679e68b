"""``dpcompile epsilon`` / ``dpcompile noise`` through dpcompile.cli.main."""

from __future__ import annotations

import re
import warnings

import pytest

from dpcompile.accounting import AccountingWarning, create_accountant
from dpcompile.cli import main

EPS_ARGS = ["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.004", "--steps", "15000",
            "--delta", "1e-5"]


def _rows(out: str) -> dict[str, list[str]]:
    rows = {}
    for line in out.splitlines():
        cells = line.split()
        if cells and cells[0] in ("rdp", "prv", "gdp"):
            rows[cells[0]] = cells[1:]
    return rows


def _eps(name: str, sigma: float, q: float, steps: int, delta: float) -> float:
    acc = create_accountant(name)
    acc.step(sigma, q, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccountingWarning)
        return acc.epsilon(delta)


def test_epsilon_all_accountants(capsys):
    assert main(EPS_ARGS) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert list(rows) == ["rdp", "prv", "gdp"]
    for name, cells in rows.items():  # printed rounded UP to 4 decimals
        value = _eps(name, 1.1, 0.004, 15000, 1e-5)
        assert value <= float(cells[0]) < value + 1e-4
    assert "optimal order 8.4" in out
    assert "CLT approximation" in out and "upper bound" in out
    # aligned: the epsilon column ends at the same position in every row
    lines = [ln for ln in out.splitlines() if ln.split() and ln.split()[0] in rows]
    ends = {ln.index(cells[0]) + len(cells[0]) for ln, cells in zip(lines, rows.values())}
    assert len(ends) == 1


def test_epsilon_one_accountant_and_epochs(capsys):
    args = ["epsilon", "--noise-multiplier", "1.1", "--sample-rate", "0.004", "--epochs", "60",
            "--delta", "1e-5", "--accountant", "prv"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert list(_rows(out)) == ["prv"]
    assert "15000 steps (60 epochs)" in out
    assert _rows(out)["prv"][0] == "2.3056"  # 2.305512... rounded up


def test_noise(capsys):
    args = ["noise", "--epsilon", "3", "--delta", "1e-5", "--sample-rate", "0.004", "--epochs",
            "60", "--accountant", "rdp"]
    assert main(args) == 0
    rows = _rows(capsys.readouterr().out)
    sigma = float(rows["rdp"][0])
    achieved = float(re.search(r"epsilon ([0-9.]+)", " ".join(rows["rdp"])).group(1))
    assert 2.99 <= achieved <= 3.0
    assert _eps("rdp", sigma, 0.004, 15000, 1e-5) <= 3.0  # σ is printed rounded up


def test_noise_all_accountants(capsys):
    args = ["noise", "--epsilon", "2", "--delta", "1e-5", "--sample-rate", "0.01", "--steps",
            "1000"]
    assert main(args) == 0
    rows = _rows(capsys.readouterr().out)
    assert list(rows) == ["rdp", "prv", "gdp"]
    sigmas = {k: float(v[0]) for k, v in rows.items()}
    assert sigmas["gdp"] < sigmas["prv"] < sigmas["rdp"]


@pytest.mark.parametrize("argv,message", [
    (["epsilon", "--noise-multiplier", "0", "--sample-rate", "0.1", "--steps", "10", "--delta",
      "1e-5"], "--noise-multiplier must be > 0"),
    (["epsilon", "--noise-multiplier", "-1", "--sample-rate", "0.1", "--steps", "10", "--delta",
      "1e-5"], "--noise-multiplier"),
    (["epsilon", "--noise-multiplier", "nan", "--sample-rate", "0.1", "--steps", "10",
      "--delta", "1e-5"], "--noise-multiplier must not be NaN"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "1.5", "--steps", "10", "--delta",
      "1e-5"], "--sample-rate must be in (0, 1]"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "-1", "--delta",
      "1e-5"], "--steps"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10", "--delta",
      "1"], "--delta must be in (0, 1)"),
    (["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--epochs", "0", "--delta",
      "1e-5"], "--epochs"),
    (["noise", "--epsilon", "-3", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "10"],
     "--epsilon"),
    (["noise", "--epsilon", "0.001", "--delta", "1e-5", "--sample-rate", "0.1", "--steps", "10",
      "--accountant", "prv"], "unreachable"),
])
def test_bad_input_exit_code_2(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"dpcompile {argv[0]}: error:")


def test_argparse_errors():
    with pytest.raises(SystemExit) as info:  # --steps and --epochs are mutually exclusive
        main(["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
              "--epochs", "1", "--delta", "1e-5"])
    assert info.value.code == 2
    with pytest.raises(SystemExit):
        main(["epsilon", "--noise-multiplier", "1", "--sample-rate", "0.1", "--steps", "10",
              "--delta", "1e-5", "--accountant", "magic"])


def test_failure_of_one_accountant_is_a_row_note(capsys):
    # ε in the thousands: PRV's grid would be too large, RDP and GDP still answer.
    argv = ["epsilon", "--noise-multiplier", "0.3", "--sample-rate", "0.9", "--steps", "20000",
            "--delta", "1e-5"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert rows["prv"][0] == "n/a" and "max_grid_points" in out
    assert float(rows["rdp"][0]) > 1000
