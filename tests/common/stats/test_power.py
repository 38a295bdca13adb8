"""Sample-size formulas: closed-form checks, target achieved, monotonicity, simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, chi2, norm

from common.errors import ConfigError
from common.stats.power import (
    auc_difference_variance,
    hanley_mcneil_variance,
    n_for_auc_difference,
    n_for_auc_halfwidth,
    n_for_mcnemar,
)


@pytest.mark.parametrize(("m", "n"), [(10, 10), (25, 40), (100, 7)])
def test_hanley_mcneil_at_half_equals_exact_null_variance(m: int, n: int) -> None:
    # Under H0 (AUC = 0.5, continuous scores) Var(U / mn) = (m + n + 1) / (12 m n) exactly.
    assert hanley_mcneil_variance(0.5, m, n) == pytest.approx((m + n + 1) / (12 * m * n))


def test_hanley_mcneil_matches_simulation_for_exponential_scores() -> None:
    # For negative-exponential scores Q1 = A/(2-A), Q2 = 2A^2/(1+A) hold exactly, so the
    # formula is the exact variance of the empirical AUC.
    rng = np.random.default_rng(0)
    a_true, m, n, reps = 0.8, 30, 40, 4000
    rate = (1 - a_true) / a_true  # X ~ Exp(rate), Y ~ Exp(1): P(X > Y) = 1 / (1 + rate)
    x = rng.exponential(1 / rate, size=(reps, m))
    y = rng.exponential(1.0, size=(reps, n))
    aucs = (x[:, :, None] > y[:, None, :]).mean(axis=(1, 2))
    assert aucs.mean() == pytest.approx(a_true, abs=0.003)
    assert aucs.var(ddof=1) == pytest.approx(hanley_mcneil_variance(a_true, m, n), rel=0.08)


@pytest.mark.parametrize(("auc", "hw", "prev"), [(0.8, 0.05, 0.5), (0.9, 0.03, 0.2),
                                                 (0.7, 0.1, 0.3)])
def test_halfwidth_target_met_and_minimal(auc: float, hw: float, prev: float) -> None:
    res = n_for_auc_halfwidth(auc, hw, prevalence=prev)
    z = norm.ppf(0.975)
    m = res["n_pos"]
    assert z * math.sqrt(hanley_mcneil_variance(auc, m, res["n_neg"])) <= hw
    n_neg_prev = math.ceil((m - 1) * (1 - prev) / prev - 1e-9)
    assert z * math.sqrt(hanley_mcneil_variance(auc, m - 1, max(n_neg_prev, 1))) > hw
    assert res["n_total"] == m + res["n_neg"]
    assert n_for_auc_halfwidth(auc, hw / 2, prevalence=prev)["n_total"] > res["n_total"]


def test_auc_difference_target_and_monotonicity() -> None:
    ind = n_for_auc_difference(0.75, 0.85)
    paired = n_for_auc_difference(0.75, 0.85, r=0.5)
    assert paired["n_total"] < ind["n_total"]  # correlation helps the paired design
    assert ind["power"] >= 0.8 and paired["power"] >= 0.8
    m, nn = ind["n_pos"], ind["n_neg"]
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    lhs = (za * math.sqrt(auc_difference_variance(0.75, 0.75, m, nn, 0.0))
           + zb * math.sqrt(auc_difference_variance(0.75, 0.85, m, nn, 0.0)))
    assert lhs <= 0.1
    assert n_for_auc_difference(0.75, 0.80)["n_total"] > ind["n_total"]
    assert n_for_auc_difference(0.75, 0.85, power=0.9)["n_total"] > ind["n_total"]


def test_mcnemar_sample_size_formula_and_exact_power() -> None:
    res = n_for_mcnemar(0.2, 0.1)
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    expected = (za * math.sqrt(0.3) + zb * math.sqrt(0.3 - 0.01)) ** 2 / 0.01
    assert res["n_unrounded"] == pytest.approx(expected)
    assert res["n_pairs"] == math.ceil(expected)
    # Exact power of the uncorrected chi-square McNemar test at that n (enumerate the
    # discordant count D ~ Bin(n, psi) and b | D ~ Bin(D, p10 / psi)): about 0.8.
    n = res["n_pairs"]
    power = 0.0
    crit = chi2.ppf(0.95, 1)
    for d in range(1, n + 1):
        b = np.arange(d + 1)
        reject = (2 * b - d) ** 2 / d > crit
        power += binom.pmf(d, n, 0.3) * binom.pmf(b[reject], d, 2 / 3).sum()
    assert 0.77 <= power <= 0.85
    assert n_for_mcnemar(0.2, 0.15)["n_pairs"] > n


def test_power_validation() -> None:
    with pytest.raises(ConfigError):
        n_for_auc_halfwidth(1.2, 0.05)
    with pytest.raises(ConfigError):
        n_for_auc_halfwidth(0.8, 0.0)
    with pytest.raises(ConfigError):
        n_for_auc_difference(0.8, 0.8)
    with pytest.raises(ConfigError):
        n_for_mcnemar(0.1, 0.1)
    with pytest.raises(ConfigError):
        n_for_mcnemar(0.7, 0.6)
