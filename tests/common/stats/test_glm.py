"""Federated Newton-Raphson logistic regression equals statsmodels Logit on pooled rows."""

from __future__ import annotations

import math

import numpy as np
import pytest
import statsmodels.api as sm

from common.errors import ConfigError, DataError
from common.stats.glm import add_intercept, fit_logistic, logistic_node_stats, summing_stats_fn
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


def test_separation_raises_clear_error() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=200)
    x = add_intercept(z)
    y = (z > 0).astype(int)  # perfectly separated
    fn = summing_stats_fn([lambda b: logistic_node_stats(x, y, b)])
    with pytest.raises(DataError, match="separat"):
        fit_logistic(fn, 2)


def test_collinear_design_raises() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(size=100)
    x = np.column_stack([np.ones(100), z, 2 * z])
    y = rng.integers(0, 2, size=100)
    fn = summing_stats_fn([lambda b: logistic_node_stats(x, y, b)])
    with pytest.raises(DataError, match="singular|separat|converge"):
        fit_logistic(fn, 3)


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
