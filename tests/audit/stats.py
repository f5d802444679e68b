"""Exact confidence bounds for the audits: Clopper–Pearson, and its Gaussian-DP consequence."""

from __future__ import annotations

import math

from scipy.stats import beta, binom, chi2, norm


def clopper_pearson_upper(successes: int, trials: int, alpha: float) -> float:
    """One-sided upper bound p⁺ with P(p ≤ p⁺) ≥ 1 − α for k ~ Binomial(trials, p)."""
    if successes >= trials:
        return 1.0
    return float(beta.ppf(1 - alpha, successes + 1, trials - successes))


def clopper_pearson_interval(successes: int, trials: int, alpha: float) -> tuple[float, float]:
    """Two-sided interval with coverage ≥ 1 − α."""
    low = 0.0 if successes == 0 else float(beta.ppf(alpha / 2, successes, trials - successes + 1))
    high = 1.0 if successes == trials else float(beta.ppf(1 - alpha / 2, successes + 1, trials - successes))
    return low, high


def gdp_mu_lower_bound(false_positives: int, false_negatives: int, trials: int, alpha: float) -> float:
    """A lower bound on μ, valid with probability ≥ 1 − α, for a μ-GDP mechanism audited by a
    fixed-threshold test with ``trials`` runs per arm.

    μ-GDP means every test has FNR ≥ Φ(Φ⁻¹(1 − FPR) − μ), i.e. μ ≥ Φ⁻¹(1 − FPR) − Φ⁻¹(FNR). The
    right side decreases in FPR and in FNR, so the Clopper–Pearson upper bounds (α/2 each, a
    union bound over the two arms) give μ_lower = Φ⁻¹(1 − FPR⁺) − Φ⁻¹(FNR⁺) ≤ μ.
    """
    fpr = clopper_pearson_upper(false_positives, trials, alpha / 2)
    fnr = clopper_pearson_upper(false_negatives, trials, alpha / 2)
    return float(norm.ppf(1 - fpr) - norm.ppf(fnr))


def binomial_goodness_of_fit(sizes: list[int], n: int, q: float) -> float:
    """p-value of Pearson's χ² test of ``sizes`` against Binomial(n, q), bins merged so that every
    expected count is at least 5."""
    draws = len(sizes)
    counts: dict[int, int] = {}
    for s in sizes:
        counts[s] = counts.get(s, 0) + 1
    bins: list[tuple[float, int]] = []  # (expected, observed)
    expected_acc, observed_acc = 0.0, 0
    for k in range(n + 1):
        expected_acc += draws * float(binom.pmf(k, n, q))
        observed_acc += counts.get(k, 0)
        if expected_acc >= 5 and draws * float(binom.sf(k, n, q)) >= 5:
            bins.append((expected_acc, observed_acc))
            expected_acc, observed_acc = 0.0, 0
    # the upper tail goes into the last bin
    last_e, last_o = bins.pop()
    bins.append((last_e + expected_acc, last_o + observed_acc))
    stat = sum((o - e) ** 2 / e for e, o in bins)
    return float(chi2.sf(stat, len(bins) - 1))


def variance_interval(sample_variance: float, count: int, alpha: float) -> tuple[float, float]:
    """Two-sided χ² confidence interval for a normal population's variance."""
    dof = count - 1
    return (dof * sample_variance / float(chi2.ppf(1 - alpha / 2, dof)),
            dof * sample_variance / float(chi2.ppf(alpha / 2, dof)))


def z(alpha: float) -> float:
    return float(norm.ppf(1 - alpha))


__all__ = ["binomial_goodness_of_fit", "clopper_pearson_interval", "clopper_pearson_upper",
           "gdp_mu_lower_bound", "variance_interval", "z", "math"]
