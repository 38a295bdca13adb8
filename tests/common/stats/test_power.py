"""Sample-size formulas: closed-form checks, target achieved, monotonicity, simulation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom, chi2, norm

from common.errors import ConfigError
from common.stats.auc import local_delong
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
    za, zb = norm.ppf(0.975), norm.ppf(0.8)
    for res, r in ((ind, 0.0), (paired, 0.5)):  # the criterion holds at n and fails at n - 1
        m, nn = res["n_pos"], res["n_neg"]
        assert (za + zb) * math.sqrt(auc_difference_variance(0.75, 0.85, m, nn, r)) <= 0.1
        assert (za + zb) * math.sqrt(auc_difference_variance(0.75, 0.85, m - 1, m - 1, r)) > 0.1
    assert n_for_auc_difference(0.75, 0.80)["n_total"] > ind["n_total"]
    assert n_for_auc_difference(0.75, 0.85, power=0.9)["n_total"] > ind["n_total"]


@pytest.mark.parametrize(("a1", "a2", "power"), [(0.85, 0.75, 0.8), (0.7, 0.6, 0.9),
                                                 (0.95, 0.9, 0.8)])
def test_auc_difference_matches_closed_form(a1: float, a2: float, power: float) -> None:
    # Prepare: with prevalence 0.5 (n_neg = n_pos = m) and r = 0 the Hanley-McNeil variance
    # of A1 - A2 is (c0 + (m - 1) c1) / m^2, so (z_a + z_b)^2 V1(m) <= delta^2 is a quadratic
    # inequality in m with the closed-form root below.
    q = [(a / (2 - a)) + (2 * a * a / (1 + a)) - 2 * a * a for a in (a1, a2)]
    c0 = a1 * (1 - a1) + a2 * (1 - a2)
    c1 = sum(q)
    k = ((norm.ppf(0.975) + norm.ppf(power)) / abs(a1 - a2)) ** 2
    root = (k * c1 + math.sqrt((k * c1) ** 2 + 4 * k * (c0 - c1))) / 2
    # Execute
    res = n_for_auc_difference(a1, a2, power=power)
    # Assert: the count is the closed-form root rounded up, the same in either order, and the
    # reported power is the Wald test's at that n
    assert res["n_pos"] == res["n_neg"] == math.ceil(root)
    assert n_for_auc_difference(a2, a1, power=power) == res
    se = math.sqrt(c0 + (res["n_pos"] - 1) * c1) / res["n_pos"]
    assert res["power"] == pytest.approx(norm.cdf(abs(a1 - a2) / se - norm.ppf(0.975))
                                         + norm.cdf(-abs(a1 - a2) / se - norm.ppf(0.975)),
                                         rel=1e-12)
    assert power <= res["power"] < power + 0.01


def test_delong_test_reaches_the_planned_power_in_simulation() -> None:
    # Prepare: the review's case. Two independent samples of n_pos positives and n_neg
    # negatives each; negative-exponential scores (for which the Hanley-McNeil variance is
    # exact), mapped into (0, 1) by the monotone x / (1 + x) so that the project's binned
    # DeLong (local_delong, default fine edges) scores them.
    res = n_for_auc_difference(0.85, 0.75)
    m, nn, reps = res["n_pos"], res["n_neg"], 2000
    rng = np.random.default_rng(2024)
    crit = norm.ppf(0.975)
    rejected = 0
    # Execute: DeLong's test for two independent AUCs, z = (A1 - A2) / sqrt(V1 + V2)
    for _ in range(reps):
        fits = []
        for auc in (0.85, 0.75):
            rate = (1 - auc) / auc  # X ~ Exp(rate), Y ~ Exp(1): P(X > Y) = auc
            x = rng.exponential(1 / rate, size=m)
            y = rng.exponential(1.0, size=nn)
            s = np.concatenate([x, y])
            fits.append(local_delong(s / (1 + s), np.r_[np.ones(m), np.zeros(nn)]))
        z = (fits[0].auc - fits[1].auc) / math.sqrt(fits[0].var + fits[1].var)
        rejected += abs(z) > crit
    # Assert: the simulated power (SE about 0.009) is close to the promised 0.80
    assert 0.77 <= rejected / reps <= 0.85


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
