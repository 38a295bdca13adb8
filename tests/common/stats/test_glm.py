"""Federated Newton-Raphson logistic regression equals statsmodels Logit on pooled rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from common.errors import ConfigError, DataError
from scipy.optimize import linprog

from common.stats.glm import (
    ConstantCovariateError,
    SeparationError,
    add_intercept,
    fit_logistic,
    logistic_node_stats,
    summing_stats_fn,
)
from common.stats.selection import aic, bic
from tests.common.stats.sites import split_indices


def _sites(seed: int, n: int = 1000, p: int = 3) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    x = add_intercept(rng.normal(size=(n, p)) * [1.0, 2.0, 0.5][:p])
    beta = np.array([-0.4, 0.8, -0.3, 1.1][: p + 1])
    y = (rng.random(n) < 1 / (1 + np.exp(-(x @ beta)))).astype(int)
    return x, y, split_indices(rng, n, 4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_equals_statsmodels_logit(seed: int) -> None:
    # Prepare
    x, y, parts = _sites(seed)
    fn = summing_stats_fn([lambda b, i=i: logistic_node_stats(x[i], y[i], b) for i in parts])
    # Execute
    fit = fit_logistic(fn, x.shape[1], names=["const", "a", "b", "c"])
    # Assert
    ref = sm.Logit(y, x).fit(disp=0, tol=1e-12, maxiter=100)
    np.testing.assert_allclose(fit.coef, ref.params, atol=1e-6)
    np.testing.assert_allclose(fit.se, ref.bse, atol=1e-6)
    np.testing.assert_allclose(fit.p, ref.pvalues, atol=1e-6)
    ci = ref.conf_int()
    np.testing.assert_allclose(fit.ci_lower, ci[:, 0], atol=1e-6)
    np.testing.assert_allclose(fit.ci_upper, ci[:, 1], atol=1e-6)
    assert fit.loglik == pytest.approx(ref.llf, abs=1e-6)
    assert fit.null_loglik == pytest.approx(ref.llnull, abs=1e-6)
    assert fit.lr_stat == pytest.approx(ref.llr, abs=1e-6)
    assert fit.lr_pvalue == pytest.approx(ref.llr_pvalue, abs=1e-9)
    assert fit.aic == pytest.approx(ref.aic, abs=1e-6)
    assert fit.bic == pytest.approx(ref.bic, abs=1e-6)
    assert aic(fit.loglik, 4) == pytest.approx(ref.aic, abs=1e-6)
    assert bic(fit.loglik, 4, 1000) == pytest.approx(ref.bic, abs=1e-6)
    assert fit.converged and fit.iterations < 15
    d = fit.as_dict()
    assert d["coefficients"][1]["name"] == "a" and d["n"] == 1000


def test_node_stats_add_up_to_pooled_stats() -> None:
    x, y, parts = _sites(5)
    beta = np.array([0.1, -0.2, 0.3, 0.0])
    pooled = logistic_node_stats(x, y, beta)
    summed = summing_stats_fn([lambda b, i=i: logistic_node_stats(x[i], y[i], b)
                               for i in parts])(beta)
    np.testing.assert_allclose(summed["grad"], pooled["grad"], atol=1e-10)
    np.testing.assert_allclose(summed["hessian"], pooled["hessian"], atol=1e-10)
    assert summed["loglik"] == pytest.approx(pooled["loglik"], abs=1e-9)


def _counting(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray] | None = None,
              ) -> tuple[list[int], object]:
    """A summing stats_fn over sites that counts its calls (query rounds)."""
    calls = [0]
    site_fn = summing_stats_fn([lambda b, i=i: logistic_node_stats(x[i], y[i], b)
                                for i in (parts or [np.arange(y.size)])])

    def fn(beta: np.ndarray) -> dict[str, object]:
        calls[0] += 1
        return site_fn(beta)

    return calls, fn


def _separable(x: np.ndarray, y: np.ndarray) -> bool:
    """LP check (reference only): is there d != 0 with (2y - 1) x'd >= 0 for every row?

    Maximises sum_i (2y_i - 1) x_i'd over the box |d| <= 1 subject to those constraints; a
    positive optimum means a (quasi-)separating direction exists (Albert & Anderson 1984).
    """
    s = (2 * y - 1)[:, None] * (x / np.abs(x).max(axis=0))
    res = linprog(-s.sum(axis=0), A_ub=-s, b_ub=np.zeros(y.size),
                  bounds=[(-1, 1)] * x.shape[1])
    return bool(res.status == 0 and -res.fun > 1e-9)


@pytest.mark.parametrize("scale", [1e-2, 1e-4])
def test_small_scale_covariate_is_fitted_like_statsmodels(scale: float) -> None:
    # Prepare: a covariate measured on a 0.01 (0.0001) scale with coefficient 85 / 0.85e4:
    # an ordinary fit (linear predictor SD 0.85), not separation
    rng = np.random.default_rng(11)
    z = rng.normal(size=1200) * scale
    x = add_intercept(np.column_stack([z, rng.normal(size=1200)]))
    y = (rng.random(1200) < 1 / (1 + np.exp(-(0.2 + 0.85 / scale * z - 0.5 * x[:, 2])))
         ).astype(int)
    parts = split_indices(rng, y.size, 3)
    _, fn = _counting(x, y, parts)
    # Execute
    fit = fit_logistic(fn, 3)
    # Assert: statsmodels on the pooled rows (and on the rescaled covariate, which statsmodels
    # fits with the same relative accuracy)
    ref = sm.Logit(y, x).fit(disp=0, tol=1e-12, maxiter=100)
    assert 0.5 / scale < fit.coef[1] < 1.2 / scale
    np.testing.assert_allclose(fit.coef, ref.params, rtol=1e-8)
    np.testing.assert_allclose(fit.se, ref.bse, rtol=1e-8)
    assert fit.loglik == pytest.approx(ref.llf, abs=1e-8)
    assert not _separable(x, y)


def test_complete_separation_is_called_separation() -> None:
    # Prepare
    rng = np.random.default_rng(0)
    z = rng.normal(size=200)
    x = add_intercept(z)
    y = (z > 0).astype(int)  # perfectly separated
    calls, fn = _counting(x, y, split_indices(rng, 200, 3))
    # Execute
    with pytest.raises(SeparationError, match="complete separation") as info:
        fit_logistic(fn, 2, names=["const", "z"])
    # Assert: the rows are separable (LP), every fitted probability went to its outcome, the
    # separating covariate is named, and it took far fewer rounds than the iteration cap
    assert _separable(x, y)
    assert info.value.complete and 1 in info.value.diverging and "'z'" in str(info.value)
    assert calls[0] < 40


@pytest.mark.parametrize("scale", [1.0, 1e-3])
def test_quasi_complete_separation_is_called_separation_at_any_scale(scale: float) -> None:
    # Prepare: a binary covariate whose every "1" row has outcome 1 (the classic
    # quasi-complete separation); the other covariate is ordinary
    rng = np.random.default_rng(3)
    a = rng.normal(size=500)
    b = (rng.random(500) < 0.1).astype(float)
    y = (rng.random(500) < 1 / (1 + np.exp(-a))).astype(int)
    y[b == 1] = 1
    x = add_intercept(np.column_stack([a, b * scale]))
    calls, fn = _counting(x, y, split_indices(rng, 500, 4))
    # Execute
    with pytest.raises(SeparationError, match="quasi-complete separation") as info:
        fit_logistic(fn, 3, names=["const", "a", "b"])
    # Assert
    assert _separable(x, y)
    assert not info.value.complete and info.value.diverging == [2]
    assert calls[0] < 40


def test_nearly_separated_data_with_a_finite_mle_are_fitted() -> None:
    # Prepare: separated except for two crossed rows near the boundary: the MLE exists,
    # with a large slope (about 14)
    z = np.linspace(-3, 3, 301)
    y = (z > 0).astype(int)
    y[np.argmin(np.abs(z - 0.2))], y[np.argmin(np.abs(z + 0.2))] = 0, 1
    x = add_intercept(z)
    _, fn = _counting(x, y)
    # Execute
    fit = fit_logistic(fn, 2)
    # Assert
    ref = sm.Logit(y, x).fit(disp=0, tol=1e-12, maxiter=100)
    assert not _separable(x, y)
    assert fit.coef[1] > 10
    np.testing.assert_allclose(fit.coef, ref.params, rtol=1e-8)
    np.testing.assert_allclose(fit.se, ref.bse, rtol=1e-8)


def test_constant_covariate_is_named_before_any_newton_step() -> None:
    # Prepare
    rng = np.random.default_rng(2)
    x = add_intercept(np.column_stack([rng.normal(size=120), np.full(120, 3.0)]))
    y = rng.integers(0, 2, size=120)
    calls, fn = _counting(x, y)
    # Execute
    with pytest.raises(ConstantCovariateError, match="'age'.*same value in every row") as info:
        fit_logistic(fn, 3, names=["const", "bmi", "age"])
    # Assert: found on the first query round
    assert info.value.index == 2 and calls[0] == 1


def test_collinear_design_raises() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=100)
    x = np.column_stack([np.ones(100), z, 2 * z])
    y = rng.integers(0, 2, size=100)
    calls, fn = _counting(x, y)
    with pytest.raises(DataError, match="'x1', 'x2' are collinear"):
        fit_logistic(fn, 3)
    assert calls[0] == 1


def test_explicit_coefficient_bound_is_still_honoured() -> None:
    x, y, parts = _sites(0)
    _, fn = _counting(x, y, parts)
    with pytest.raises(DataError, match="max_abs_coef = 0.5"):
        fit_logistic(fn, 4, max_abs_coef=0.5)


def test_input_validation() -> None:
    with pytest.raises(DataError):
        logistic_node_stats(np.ones(5), [0, 1, 0, 1, 1], [0.0])
    with pytest.raises(ConfigError):
        logistic_node_stats(np.ones((5, 2)), [0, 1, 0, 1, 1], [0.0])
    with pytest.raises(DataError):
        logistic_node_stats(np.ones((5, 1)), [0, 1, 0, 1], [0.0])
    with pytest.raises(ConfigError):
        fit_logistic(lambda b: {}, 0)
    with pytest.raises(DataError):
        fit_logistic(lambda b: {"grad": [0.0], "hessian": [[1.0]], "loglik": 0.0}, 1)
    assert math.isnan(
        fit_logistic(lambda b: logistic_node_stats(np.ones((4, 1)), [0, 1, 1, 0], b), 1,
                     intercept_index=None).lr_stat)


def _fixed_point_fn(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray], with_error: bool):
    """Three nodes' statistics each rounded to 2^-32, as secure aggregation releases them,
    then summed; ``with_error`` also reports that rounding (``sum_error``)."""

    def fn(beta: np.ndarray) -> dict:
        total: dict = {}
        for i in parts:
            node = logistic_node_stats(x[i], y[i], beta)
            for key in ("grad", "hessian", "loglik"):
                node[key] = np.round(np.asarray(node[key], dtype=np.float64) * 2**32) / 2**32
            for key in ("grad", "hessian", "loglik", "n"):
                total[key] = total.get(key, 0) + np.asarray(node[key])
        if with_error:
            total["sum_error"] = len(parts) * 2.0**-33
        return total
    return fn


def _narrow_scores(noise: float) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Calibration-like rows: logit(score) within a narrow band, a strong signal (the make
    demo validation set whose Platt fit stalled at a Newton step of 1.4e-8)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 234)
    lg = -1.1 + 0.12 * (2 * y - 1) + rng.normal(0, noise, y.size)
    return add_intercept(lg[:, None]), y, [np.arange(k, 234, 3) for k in range(3)]


def test_fixed_point_sums_converge_to_the_pooled_fit_when_their_rounding_is_given() -> None:
    x, y, parts = _narrow_scores(0.07)
    with pytest.raises(DataError, match="did not converge"):  # tol 1e-10 is below the rounding
        fit_logistic(_fixed_point_fn(x, y, parts, False), 2, intercept_index=None)
    fit = fit_logistic(_fixed_point_fn(x, y, parts, True), 2, intercept_index=None)
    ref = sm.Logit(y, x).fit(disp=0, tol=1e-12, maxiter=200)
    np.testing.assert_allclose(fit.coef, ref.params, rtol=1e-7)
    np.testing.assert_allclose(fit.se, ref.bse, rtol=1e-5)
    assert fit.iterations <= 12


def test_separation_under_fixed_point_sums_is_still_called_separation() -> None:
    x, y, parts = _narrow_scores(0.03)  # the classes no longer overlap
    assert linprog_separates(x, y)
    with pytest.raises(SeparationError, match="complete separation"):
        fit_logistic(_fixed_point_fn(x, y, parts, True), 2, intercept_index=None)


def linprog_separates(x: np.ndarray, y: np.ndarray) -> bool:
    """Whether some line separates the classes strictly (a feasibility LP)."""
    sign = np.where(y == 1, 1.0, -1.0)
    res = linprog(np.zeros(x.shape[1]), A_ub=-(sign[:, None] * x), b_ub=-np.ones(len(y)),
                  bounds=[(None, None)] * x.shape[1])
    return bool(res.status == 0)
