"""Calibration statistics from summed bins equal the pooled computations."""

from __future__ import annotations

import numpy as np
import pytest
import statsmodels.api as sm
from sklearn.metrics import brier_score_loss

from common.errors import DataError
from common.stats import sum_stats
from common.stats.bins import uniform_edges
from common.stats.calibration import (
    brier_from_sums,
    calibration_bin_sums,
    calibration_glm_stats,
    calibration_in_the_large_stats,
    expected_calibration_error,
    fit_calibration,
    reliability_diagram,
)
from common.stats.glm import fit_logistic, summing_stats_fn
from tests.common.stats.sites import scored_labels, split_indices


def _data(seed: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    s, y = scored_labels(rng, 1200)
    return s, y, split_indices(rng, s.size, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_brier_ece_reliability_equal_pooled(seed: int) -> None:
    # Prepare
    s, y, parts = _data(seed)
    edges = uniform_edges(15)
    # Execute
    pooled = sum_stats([calibration_bin_sums(s[i], y[i], edges=edges) for i in parts])
    # Assert: Brier vs sklearn
    assert brier_from_sums(pooled) == pytest.approx(brier_score_loss(y, s), abs=1e-12)
    # ECE / reliability vs a direct pooled computation
    b = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, 14)
    ece = sum(abs(y[b == k].mean() - s[b == k].mean()) * np.mean(b == k)
              for k in range(15) if np.any(b == k))
    assert expected_calibration_error(pooled) == pytest.approx(ece, abs=1e-12)
    rd = reliability_diagram(pooled, edges=edges)
    k = int(np.bincount(b).argmax())
    assert rd["observed"][k] == pytest.approx(y[b == k].mean(), abs=1e-12)
    assert rd["mean_score"][k] == pytest.approx(s[b == k].mean(), abs=1e-12)
    assert sum(rd["count"]) == s.size  # type: ignore[arg-type]


def test_calibration_slope_and_intercept_equal_statsmodels() -> None:
    # Prepare: miscalibrated scores (too extreme): true slope 0.6
    rng = np.random.default_rng(4)
    lp = rng.normal(size=1500) * 2
    y = (rng.random(1500) < 1 / (1 + np.exp(-(0.3 + 0.6 * lp)))).astype(int)
    s = 1 / (1 + np.exp(-lp))
    parts = split_indices(rng, s.size, 4)
    fn = summing_stats_fn([lambda b, i=i: calibration_glm_stats(s[i], y[i], b) for i in parts])
    # Execute
    fit = fit_calibration(fn)
    # Assert
    ref = sm.Logit(y, sm.add_constant(lp)).fit(disp=0, tol=1e-12, maxiter=100)
    np.testing.assert_allclose(fit.coef, ref.params, atol=1e-6)
    np.testing.assert_allclose(fit.se, ref.bse, atol=1e-6)
    assert 0.4 < fit.coef[1] < 0.8
    # Calibration-in-the-large: intercept with logit(score) as an offset
    fn2 = summing_stats_fn([lambda b, i=i: calibration_in_the_large_stats(s[i], y[i], b)
                            for i in parts])
    citl = fit_logistic(fn2, 1, names=["intercept"])
    ref2 = sm.GLM(y, np.ones((y.size, 1)), family=sm.families.Binomial(), offset=lp).fit(
        tol=1e-12)
    assert citl.coef[0] == pytest.approx(ref2.params[0], abs=1e-6)
    assert citl.se[0] == pytest.approx(ref2.bse[0], abs=1e-6)


def test_calibration_input_checks() -> None:
    with pytest.raises(DataError):
        calibration_bin_sums([0.2, 1.3], [0, 1])
    with pytest.raises(DataError):
        brier_from_sums({"count": [0, 0], "score_sum": [0, 0], "label_sum": [0, 0],
                         "sq_error_sum": 0.0})
    with pytest.raises(DataError):
        expected_calibration_error({"count": [2, 1], "score_sum": [0.5, 0.5],
                                    "label_sum": [3, 0], "sq_error_sum": 0.1})
    with pytest.raises(DataError):
        expected_calibration_error({"count": [2, -1], "score_sum": [0.5, 0.5],
                                    "label_sum": [1, 0], "sq_error_sum": 0.1})


@pytest.mark.parametrize("value", [0.3, 0.5, 1.0])
def test_constant_scores_are_named_on_the_first_round(value: float) -> None:
    # Prepare: a model that gives every patient the same score (0.5: logit 0; 1.0: clipped)
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, size=300)
    s = np.full(300, value)
    parts = split_indices(rng, 300, 3)
    calls = [0]
    sites = summing_stats_fn([lambda b, i=i: calibration_glm_stats(s[i], y[i], b)
                              for i in parts])

    def fn(beta: np.ndarray) -> dict[str, object]:
        calls[0] += 1
        return sites(beta)

    # Execute
    with pytest.raises(DataError, match="logit\\(score\\) is constant") as info:
        fit_calibration(fn)
    # Assert: said so on the first query round, not after every Newton round; the reason
    # that may leave the coordinator says the same
    assert calls[0] == 1
    assert "constant" in info.value.safe_reason and "separat" not in str(info.value)
