"""The shared interface: history, validation, registry, state_dict round trip and tampering."""

from __future__ import annotations

import copy
import json
import math
import warnings

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dpcompile.accounting import (
    Accountant,
    AccountingWarning,
    GDPAccountant,
    PRVAccountant,
    RDPAccountant,
    accountant_from_state_dict,
    available_accountants,
    create_accountant,
    register_accountant,
)

ALL = ["rdp", "prv", "gdp"]


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccountingWarning)
        yield


def test_registry():
    assert set(ALL) <= set(available_accountants())
    assert type(create_accountant("rdp")) is RDPAccountant
    assert type(create_accountant("prv", eps_error=0.1)) is PRVAccountant
    assert create_accountant("prv", eps_error=0.1).eps_error == 0.1
    assert type(create_accountant("gdp")) is GDPAccountant
    with pytest.raises(ValueError, match="unknown accountant 'nope'.*gdp.*prv.*rdp"):
        create_accountant("nope")
    for cls, name in [(RDPAccountant, "rdp"), (PRVAccountant, "prv"), (GDPAccountant, "gdp")]:
        assert cls.name == name


@pytest.fixture
def _clean_registry():
    from dpcompile.accounting import base

    saved = dict(base._REGISTRY)
    yield
    base._REGISTRY.clear()
    base._REGISTRY.update(saved)


def test_register_custom_accountant(_clean_registry):
    @register_accountant("pure_composition_test")
    class Naive(Accountant):
        """ε of T steps, each (1/σ)-ish: a toy for the registry test only."""

        def _compute_epsilon(self, delta: float) -> float:
            return sum(n / s for s, _, n in self._history)

    assert "pure_composition_test" in available_accountants()
    acc = create_accountant("pure_composition_test")
    acc.step(2.0, 0.5, 10)
    assert acc.epsilon(1e-5) == 5.0
    assert acc.name == "pure_composition_test"
    restored = accountant_from_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert isinstance(restored, Naive) and restored.epsilon(1e-5) == 5.0
    with pytest.raises(ValueError, match="already registered"):
        @register_accountant("rdp")
        class Other(Accountant):
            def _compute_epsilon(self, delta: float) -> float:
                return 0.0
    with pytest.raises(TypeError):
        register_accountant("not_an_accountant")(int)
    with pytest.raises(ValueError):
        register_accountant("has space")


@pytest.mark.parametrize("name", ALL)
def test_history_and_steps(name):
    acc = create_accountant(name)
    assert acc.steps == len(acc) == 0 and acc.history == []
    acc.step(1.0, 0.01)
    acc.step(1.0, 0.01, steps=9)
    acc.step(noise_multiplier=2.0, sample_rate=0.01, steps=5)
    acc.step(1.0, 0.01, 0)  # no-op
    acc.step(1.0, 0.01, 3)
    assert acc.history == [(1.0, 0.01, 10), (2.0, 0.01, 5), (1.0, 0.01, 3)]
    assert acc.steps == len(acc) == 18
    acc.history.append((9.0, 0.9, 9))  # a copy: cannot corrupt the accountant
    assert acc.steps == 18
    assert acc.get_epsilon(1e-5) == acc.epsilon(1e-5) > 0


@pytest.mark.parametrize("name", ALL)
def test_zero_steps_and_zero_sigma(name):
    acc = create_accountant(name)
    assert acc.epsilon(1e-5) == 0.0
    acc.step(1.0, 0.1, 10)
    acc.step(0.0, 0.1, 1)  # σ = 0 is accepted (debugging), ε is then infinite
    assert acc.epsilon(1e-5) == math.inf


BAD_STEP = [
    ((-1.0, 0.1, 1), "noise_multiplier"),
    ((float("nan"), 0.1, 1), "noise_multiplier"),
    ((float("inf"), 0.1, 1), "noise_multiplier"),
    (("1.0", 0.1, 1), "noise_multiplier"),
    ((True, 0.1, 1), "noise_multiplier"),
    ((1.0, 0.0, 1), "sample_rate"),
    ((1.0, -0.1, 1), "sample_rate"),
    ((1.0, 1.5, 1), "sample_rate"),
    ((1.0, float("nan"), 1), "sample_rate"),
    ((1.0, 0.1, -1), "steps"),
    ((1.0, 0.1, 2.5), "steps"),
    ((1.0, 0.1, float("nan")), "steps"),
    ((1.0, 0.1, True), "steps"),
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("args,argname", BAD_STEP)
def test_bad_step_input(name, args, argname):
    acc = create_accountant(name)
    with pytest.raises(ValueError, match=argname):
        acc.step(*args)
    assert acc.history == []


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("delta", [0.0, 1.0, -1e-5, 2.0, float("nan"), "1e-5", None])
def test_bad_delta(name, delta):
    acc = create_accountant(name)
    acc.step(1.0, 0.1, 10)
    with pytest.raises(ValueError, match="delta"):
        acc.epsilon(delta)


def test_numpy_scalars_accepted():
    np = pytest.importorskip("numpy")
    acc = RDPAccountant()
    acc.step(np.float32(1.5), np.float64(0.04), np.int64(2250))
    assert acc.history == [(1.5, 0.04, 2250)]
    assert acc.epsilon(np.float64(1e-5)) == pytest.approx(7.32911117143, abs=1e-10)


@pytest.mark.parametrize("name,kwargs", [("rdp", {"orders": [1.5, 2.0, 8.0, 32.0]}), ("rdp", {}),
                                         ("prv", {"eps_error": 0.05, "delta_error": 1e-9}),
                                         ("prv", {}), ("gdp", {})])
def test_state_round_trip(name, kwargs):
    acc = create_accountant(name, **kwargs)
    acc.step(1.1, 0.01, 100)
    acc.step(0.9, 0.02, 50)
    state = acc.state_dict()
    text = json.dumps(state)  # plain JSON, for checkpoints and graph metadata
    assert state["name"] == name and state["history"] == [[1.1, 0.01, 100], [0.9, 0.02, 50]]
    if name == "rdp":  # the default grid is stored as null, a custom one as a list
        assert state["settings"]["orders"] == kwargs.get("orders")
    fresh = create_accountant(name)
    fresh.load_state_dict(json.loads(text))
    assert fresh.history == acc.history
    assert fresh.state_dict() == state
    assert fresh.epsilon(1e-6) == acc.epsilon(1e-6)
    again = accountant_from_state_dict(json.loads(text))
    assert type(again) is type(acc) and again.epsilon(1e-6) == acc.epsilon(1e-6)
    again.step(1.1, 0.01)
    assert again.steps == acc.steps + 1


def _state():
    acc = PRVAccountant(eps_error=0.05)
    acc.step(1.0, 0.01, 10)
    return acc.state_dict()


def _tamper(path, value):
    state = copy.deepcopy(_state())
    target = state
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return state


TAMPERED = [
    (_tamper(("name",), "rdp"), "name"),
    (_tamper(("version",), 99), "version"),
    (_tamper(("history",), KeyError), "missing"),
    (_tamper(("history",), "nope"), "history"),
    (_tamper(("history", 0), [1.0, 0.01]), r"history\[0\]"),
    (_tamper(("history", 0, 2), -5), "steps"),
    (_tamper(("history", 0, 2), 1.5), "steps"),
    (_tamper(("history", 0, 0), float("nan")), "noise_multiplier"),
    (_tamper(("history", 0, 0), -1.0), "noise_multiplier"),
    (_tamper(("history", 0, 1), 1.5), "sample_rate"),
    (_tamper(("history", 0, 1), None), "sample_rate"),
    (_tamper(("settings",), []), "settings"),
    (_tamper(("settings", "eps_error"), -1.0), "eps_error"),
    (_tamper(("settings", "delta_error"), float("nan")), "delta_error"),
    (_tamper(("settings", "bogus"), 1), "bogus"),
    (_tamper(("extra",), 1), "extra"),
    ("not a dict", "mapping"),
]


@pytest.mark.parametrize("state,match", TAMPERED)
def test_tampered_state_rejected_and_harmless(state, match):
    acc = PRVAccountant(eps_error=0.2)
    acc.step(2.0, 0.1, 3)
    before = acc.state_dict()
    with pytest.raises(ValueError, match=match):
        acc.load_state_dict(state)
    assert acc.state_dict() == before


@pytest.mark.parametrize("name", ALL)
def test_load_over_a_different_history(name):
    """Loading must discard everything cached for the old history, longer or shorter."""
    long_hist = [(1.0, 0.01, 10), (2.0, 0.02, 20), (1.5, 0.03, 30), (0.9, 0.01, 40)]
    short_hist = [(3.0, 0.1, 5), (1.2, 0.05, 7)]
    for before, after in [(short_hist, long_hist), (long_hist, short_hist)]:
        acc, ref = create_accountant(name), create_accountant(name)
        for seg in before:
            acc.step(*seg)
        acc.epsilon(1e-5)  # fill the caches
        for seg in after:
            ref.step(*seg)
        acc.load_state_dict(ref.state_dict())
        assert acc.epsilon(1e-5) == ref.epsilon(1e-5)
        acc.step(1.0, 0.01, 3)
        ref.step(1.0, 0.01, 3)
        assert acc.epsilon(1e-5) == ref.epsilon(1e-5)


def test_rdp_tampered_orders():
    acc = RDPAccountant()
    state = acc.state_dict()
    state["settings"]["orders"] = [0.5, 2.0]
    with pytest.raises(ValueError, match="orders"):
        RDPAccountant().load_state_dict(state)


def test_load_replaces_settings_and_history():
    src = RDPAccountant(orders=[2.0, 4.0, 8.0])
    src.step(1.0, 0.1, 10)
    dst = RDPAccountant()
    dst.step(5.0, 0.5, 99)
    dst.load_state_dict(src.state_dict())
    assert dst.orders == [2.0, 4.0, 8.0] and dst.history == [(1.0, 0.1, 10)]
    assert dst.epsilon(1e-5) == src.epsilon(1e-5)


histories = st.lists(st.tuples(st.floats(0.3, 10.0), st.floats(1e-4, 1.0), st.integers(0, 5000)),
                     min_size=0, max_size=6)


@given(history=histories)
def test_state_round_trip_random(history):
    acc = RDPAccountant()
    for s, q, n in history:
        acc.step(s, q, n)
    fresh = RDPAccountant()
    fresh.load_state_dict(json.loads(json.dumps(acc.state_dict())))
    assert fresh.history == acc.history
    assert fresh.steps == sum(n for _, _, n in history)
    assert fresh.epsilon(1e-5) == acc.epsilon(1e-5)


def test_training_setup_loads_no_heavy_scipy_packages():
    """Creating the default accountant and recording steps imports neither scipy.optimize,
    integrate nor signal (~50 MB resident); computing ε does, and the lazy names resolve."""
    import subprocess
    import sys

    code = (
        "import sys, dpcompile\n"
        "from dpcompile.accounting import available_accountants, create_accountant\n"
        "assert available_accountants() == ['gdp', 'prv', 'rdp'], available_accountants()\n"
        "acc = create_accountant('prv')\n"
        "acc.step(1.0, 0.01, steps=100)\n"
        "heavy = ('scipy.optimize', 'scipy.integrate', 'scipy.signal')\n"
        "assert not [m for m in heavy if m in sys.modules], [m for m in heavy if m in sys.modules]\n"
        "assert 0 < acc.epsilon(1e-5) < 10\n"
        "from dpcompile.accounting import GDPAccountant, PRVAccountant, gaussian_mu\n"
        "assert type(acc) is PRVAccountant and create_accountant('gdp').name == 'gdp'\n"
        "assert 'scipy.optimize' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
