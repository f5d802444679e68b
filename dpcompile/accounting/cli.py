"""``dpcompile epsilon`` and ``dpcompile noise``: privacy accounting from the command line.

    dpcompile epsilon --noise-multiplier 1.1 --sample-rate 0.004 --steps 15000 --delta 1e-5
    dpcompile noise --epsilon 3 --delta 1e-5 --sample-rate 0.004 --epochs 60

Without ``--accountant`` all three accountants are printed side by side.
"""

from __future__ import annotations

import argparse
import math
import warnings
from collections.abc import Callable
from typing import Any

from dpcompile.accounting._validation import (
    check_delta,
    check_noise_multiplier,
    check_positive,
    check_sample_rate,
)
from dpcompile.accounting.base import Accountant, AccountingWarning, create_accountant
from dpcompile.accounting.calibration import get_noise_multiplier, resolve_steps
from dpcompile.accounting.rdp import RDPAccountant, RDPOrderWarning

ACCOUNTANTS = ("rdp", "prv", "gdp")


def register(subparsers: Any) -> None:
    """Add the ``epsilon`` and ``noise`` sub-commands."""
    p = subparsers.add_parser(
        "epsilon", help="privacy spent (epsilon) by DP-SGD with Poisson sampling",
        description="Print epsilon at the given delta for a Poisson-subsampled Gaussian "
                    "mechanism run for --steps (or --epochs) steps.",
    )
    p.add_argument("--noise-multiplier", type=float, required=True, metavar="SIGMA")
    _common(p)
    p.set_defaults(run=run_epsilon)

    p = subparsers.add_parser(
        "noise", help="noise multiplier for a target (epsilon, delta)",
        description="Calibrate the noise multiplier so that epsilon stays at or below "
                    "--epsilon (never above it).",
    )
    p.add_argument("--epsilon", type=float, required=True, help="target epsilon")
    _common(p)
    p.add_argument("--tolerance", type=float, default=0.01,
                   help="achieved epsilon is within this much below the target (default 0.01)")
    p.set_defaults(run=run_noise)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sample-rate", type=float, required=True, metavar="Q",
                   help="Poisson sample rate (probability that a record joins a step)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--steps", type=int, help="number of steps")
    g.add_argument("--epochs", type=float, help="epochs; steps = ceil(epochs / sample rate)")
    p.add_argument("--delta", type=float, required=True, help="delta, e.g. 1e-5")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default=None,
                   help="one accountant (default: all three side by side)")
    p.add_argument("--eps-error", type=float, default=0.01,
                   help="PRV accountant: epsilon error of the bound (default 0.01)")


_NOTES = {
    "prv": "upper bound, eps_error {eps_error:g}",
    "gdp": "CLT approximation, can under-estimate",
}


def _kwargs(name: str, args: argparse.Namespace) -> dict[str, Any]:
    return {"eps_error": check_positive(args.eps_error, name="--eps-error")} if name == "prv" else {}


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {i for i, h in enumerate(header) if h in ("epsilon", "noise multiplier")}

    def fmt(row: list[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
        return "  ".join(cells).rstrip()

    return "\n".join([fmt(header), *(fmt(r) for r in rows)])


def _guarded(names: tuple[str, ...], fn: Callable[[str], tuple[str, str]]) -> list[list[str]]:
    """Run ``fn`` per accountant; with several accountants a failure becomes a row note."""
    rows = []
    for name in names:
        try:
            value, note = fn(name)
        except ValueError as err:
            if len(names) == 1:
                raise
            value, note = "n/a", f"error: {err}"
        rows.append([name, value, note])
    return rows


def _header(args: argparse.Namespace, steps: int) -> str:
    span = f"{steps} steps" if args.epochs is None else f"{steps} steps ({args.epochs:g} epochs)"
    return f"sample rate {args.sample_rate:g}, {span}, delta {args.delta:g}"


def run_epsilon(args: argparse.Namespace) -> int:
    sigma = check_noise_multiplier(args.noise_multiplier, allow_zero=False,
                                   name="--noise-multiplier")
    q = check_sample_rate(args.sample_rate, name="--sample-rate")
    delta = check_delta(args.delta, name="--delta")
    steps = _steps(args, q)
    names = ACCOUNTANTS if args.accountant is None else (args.accountant,)

    def one(name: str) -> tuple[str, str]:
        acc: Accountant = create_accountant(name, **_kwargs(name, args))
        acc.step(sigma, q, steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", AccountingWarning)
            eps = acc.epsilon(delta)
        note = _NOTES.get(name, "").format(eps_error=args.eps_error)
        if isinstance(acc, RDPAccountant):
            order = acc.optimal_order(delta)
            note = f"optimal order {order:g}" if not math.isnan(order) else ""
            if any(issubclass(w.category, RDPOrderWarning) for w in caught):
                note += " (at the edge of the order grid)"
        return _up(eps), note

    rows = _guarded(names, one)
    print(f"epsilon for noise multiplier {sigma:g}, {_header(args, steps)}")
    print(_table(["accountant", "epsilon", "notes"], rows))
    return 0


def run_noise(args: argparse.Namespace) -> int:
    target = check_positive(args.epsilon, name="--epsilon")
    q = check_sample_rate(args.sample_rate, name="--sample-rate")
    delta = check_delta(args.delta, name="--delta")
    tol = check_positive(args.tolerance, name="--tolerance")
    steps = _steps(args, q)
    names = ACCOUNTANTS if args.accountant is None else (args.accountant,)

    def one(name: str) -> tuple[str, str]:
        kwargs = _kwargs(name, args)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccountingWarning)
            sigma = get_noise_multiplier(target, delta, q, steps=steps, accountant=name,
                                         epsilon_tolerance=tol, **kwargs)
            # Print σ rounded UP, and the ε of the printed value: what the user copies is safe.
            shown = math.ceil(sigma * 1e4) / 1e4
            acc = create_accountant(name, **kwargs)
            acc.step(shown, q, steps)
            eps = acc.epsilon(delta)
            if eps > target:  # PRV is not exactly monotone in σ at the 1e-9 level
                shown, eps = sigma, _eps_at(name, kwargs, sigma, q, steps, delta)
        note = f"epsilon {_up(eps)}"
        if name in _NOTES:
            note += "; " + _NOTES[name].format(eps_error=args.eps_error)
        return (f"{shown:.4f}" if shown != sigma else repr(sigma)), note

    rows = _guarded(names, one)
    print(f"noise multiplier for epsilon {target:g}, {_header(args, steps)}")
    print(_table(["accountant", "noise multiplier", "notes"], rows))
    return 0


def _eps_at(name: str, kwargs: dict[str, Any], sigma: float, q: float, steps: int,
            delta: float) -> float:
    acc = create_accountant(name, **kwargs)
    acc.step(sigma, q, steps)
    return acc.epsilon(delta)


def _up(eps: float) -> str:
    """ε rounded UP to 4 decimals: a printed bound is never below the computed one."""
    if math.isinf(eps):
        return "inf"
    return f"{math.ceil(eps * 1e4) / 1e4:.4f}"


def _steps(args: argparse.Namespace, q: float) -> int:
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.epochs is not None:
        check_positive(args.epochs, name="--epochs")
    return resolve_steps(args.steps, args.epochs, q)
