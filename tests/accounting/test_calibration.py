"""Calibration of σ: never above the target, within the tolerance, clear errors."""

from __future__ import annotations

import math
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dpcompile.accounting import (
    AccountingWarning,
    create_accountant,
    get_noise_multiplier,
    steps_for_epochs,
)


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccountingWarning)
        yield


def _eps(name, sigma, q, steps, delta, **kw):
    acc = create_accountant(name, **kw)
    acc.step(sigma, q, steps)
    return acc.epsilon(delta)


@pytest.mark.parametrize("name", ["rdp", "prv", "gdp"])
def test_calibration_hits_target_from_below(name):
    sigma = get_noise_multiplier(3.0, 1e-5, 0.004, epochs=60, accountant=name)
    eps = _eps(name, sigma, 0.004, 15000, 1e-5)
    assert 3.0 - 0.01 <= eps <= 3.0
    # and a slightly smaller σ would overshoot: σ is not needlessly large
    assert _eps(name, sigma * 0.99, 0.004, 15000, 1e-5) > 3.0 - 0.01


def test_calibration_accountant_kwargs_and_tolerance():
    sigma = get_noise_multiplier(2.0, 1e-6, 0.01, steps=2000, accountant="prv", eps_error=0.05,
                                 epsilon_tolerance=0.001)
    eps = _eps("prv", sigma, 0.01, 2000, 1e-6, eps_error=0.05)
    assert 2.0 - 0.001 <= eps <= 2.0


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_against_opacus():
    utils = pytest.importorskip("opacus.accountants.utils")
    ref = utils.get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.004,
                                     epochs=60, accountant="rdp")
    ours = get_noise_multiplier(3.0, 1e-5, 0.004, epochs=60, accountant="rdp")
    assert ours == pytest.approx(ref, rel=0.01)


@settings(max_examples=12)
@given(eps=st.floats(0.2, 20.0), delta=st.floats(1e-10, 1e-3), q=st.floats(1e-4, 1.0),
       steps=st.integers(1, 50_000))
def test_never_above_target_rdp(eps, delta, q, steps):
    try:
        sigma = get_noise_multiplier(eps, delta, q, steps=steps, accountant="rdp")
    except ValueError as err:
        assert "unreachable" in str(err)
        return
    achieved = _eps("rdp", sigma, q, steps, delta)
    assert achieved <= eps
    assert achieved >= eps - 0.01 or sigma == pytest.approx(1e-2)


def test_steps_for_epochs():
    assert steps_for_epochs(60, 0.004) == 15000
    assert steps_for_epochs(3, 0.1) == 30  # 3 / 0.1 = 30.000000000000004 in floating point
    assert steps_for_epochs(1, 0.3) == 4  # ceil(3.33)
    assert steps_for_epochs(0.5, 1.0) == 1
    with pytest.raises(ValueError, match="epochs"):
        steps_for_epochs(0, 0.1)
    with pytest.raises(ValueError, match="sample_rate"):
        steps_for_epochs(1, 0)


def test_epochs_equals_steps():
    a = get_noise_multiplier(1.0, 1e-5, 0.01, epochs=5, accountant="rdp")
    b = get_noise_multiplier(1.0, 1e-5, 0.01, steps=500, accountant="rdp")
    assert a == b


def test_unreachable():
    # The PRV upper bound is estimate + eps_error: a target below eps_error cannot be met.
    with pytest.raises(ValueError, match="unreachable"):
        get_noise_multiplier(0.005, 1e-5, 0.01, steps=100, accountant="prv")
    # RDP with orders up to 1024 cannot certify ε below ~0.004 at δ = 1e-5.
    with pytest.raises(ValueError, match="unreachable"):
        get_noise_multiplier(1e-3, 1e-5, 0.5, steps=100, accountant="rdp")


def test_flat_epsilon_stops():
    # P[the record is ever sampled] = 100 · 1e-8 < δ: the true ε is 0 for every σ > 0, and PRV
    # certifies ε ≈ eps_error for every σ it can handle (small σ: heavy tails, grid too big).
    kw = {"eps_error": 0.1, "max_grid_points": 1 << 20}  # small grids keep this test fast
    sigma = get_noise_multiplier(1.0, 1e-5, 1e-8, steps=100, accountant="prv", **kw)
    assert sigma < 0.1
    assert _eps("prv", sigma, 1e-8, 100, 1e-5, **kw) <= 0.11


@pytest.mark.parametrize("kwargs,match", [
    ({"target_epsilon": 0.0}, "target_epsilon"),
    ({"target_epsilon": float("nan")}, "target_epsilon"),
    ({"target_epsilon": math.inf}, "target_epsilon"),
    ({"target_delta": 0.0}, "target_delta"),
    ({"target_delta": 1.0}, "target_delta"),
    ({"sample_rate": 0.0}, "sample_rate"),
    ({"sample_rate": 1.01}, "sample_rate"),
    ({"steps": 0}, "steps"),
    ({"steps": -3}, "steps"),
    ({"steps": 10, "epochs": 1.0}, "exactly one"),
    ({"steps": None}, "exactly one"),
    ({"steps": None, "epochs": -1.0}, "epochs"),
    ({"accountant": "nope"}, "unknown accountant"),
    ({"epsilon_tolerance": 0.0}, "epsilon_tolerance"),
    ({"eps_error": -1.0}, "eps_error"),
])
def test_bad_input(kwargs, match):
    args = {"target_epsilon": 1.0, "target_delta": 1e-5, "sample_rate": 0.01, "steps": 100,
            "accountant": "prv"}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        get_noise_multiplier(**args)
