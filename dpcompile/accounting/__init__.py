"""Privacy accounting for the Poisson-subsampled Gaussian mechanism (DP-SGD).

Three accountants share one interface (:class:`Accountant`): ``step(noise_multiplier,
sample_rate, steps=1)``, ``epsilon(delta)``, ``state_dict()`` / ``load_state_dict()``:

* ``"rdp"`` — :class:`RDPAccountant`, Rényi DP; an upper bound, cheap enough for every step.
* ``"prv"`` — :class:`PRVAccountant`, numerical composition of privacy loss random variables;
  a certified upper bound within ``eps_error`` of the exact ε.
* ``"gdp"`` — :class:`GDPAccountant`, central-limit approximation; can under-estimate ε.

Add one with ``@register_accountant("name")``; build one with ``create_accountant(name)``.
``get_noise_multiplier`` calibrates σ for a target (ε, δ). Only numpy and scipy are used.
"""

from dpcompile.accounting.base import (
    Accountant,
    AccountingWarning,
    accountant_from_state_dict,
    available_accountants,
    create_accountant,
    register_accountant,
)
from dpcompile.accounting.calibration import get_noise_multiplier, steps_for_epochs
from dpcompile.accounting.gdp import (
    GDPAccountant,
    GDPApproximationWarning,
    gaussian_delta,
    gaussian_epsilon,
    gaussian_mu,
)
from dpcompile.accounting.prv import PRVAccountant
from dpcompile.accounting.rdp import DEFAULT_ORDERS, RDPAccountant, RDPOrderWarning, compute_rdp

__all__ = [
    "Accountant",
    "AccountingWarning",
    "DEFAULT_ORDERS",
    "GDPAccountant",
    "GDPApproximationWarning",
    "PRVAccountant",
    "RDPAccountant",
    "RDPOrderWarning",
    "accountant_from_state_dict",
    "available_accountants",
    "compute_rdp",
    "create_accountant",
    "gaussian_delta",
    "gaussian_epsilon",
    "gaussian_mu",
    "get_noise_multiplier",
    "register_accountant",
    "steps_for_epochs",
]
