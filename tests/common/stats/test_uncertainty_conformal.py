"""Entropy summaries and split conformal from summed histograms equal pooled computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import entropy

from common.errors import DataError
from common.stats import sum_stats
from common.stats.conformal import (
    conformal_edges,
    conformal_quantile,
    coverage_counts,
    coverage_summary,
    nonconformity_histogram,
    nonconformity_scores,
)
from common.stats.uncertainty import (
    entropy_node_stats,
    entropy_summary,
    expected_entropy,
    mutual_information,
    predictive_entropy,
)
from tests.common.stats.sites import scored_labels, split_indices


def test_entropy_matches_scipy_and_pools() -> None:
    # Prepare: 10 MC-dropout passes for 600 patients, 3 classes
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(1, 600, 3)) * 2 + rng.normal(size=(10, 600, 3)) * 0.5
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    # Execute
    h = predictive_entropy(probs)
    parts = split_indices(rng, 600, 4)
    pooled = sum_stats([entropy_node_stats(h[i], edges=np.linspace(0, math.log(3), 31))
                        for i in parts])
    summ = entropy_summary(pooled, edges=np.linspace(0, math.log(3), 31))
    # Assert
    np.testing.assert_allclose(h, entropy(probs.mean(0), axis=-1), atol=1e-12)
    np.testing.assert_allclose(expected_entropy(probs), entropy(probs, axis=-1).mean(0),
                               atol=1e-12)
    assert np.all(mutual_information(probs) >= 0)
    assert summ["mean"] == pytest.approx(h.mean(), abs=1e-12)
    assert summ["sd"] == pytest.approx(h.std(ddof=1), abs=1e-10)
    width = math.log(3) / 30
    med = summ["quantiles"]["q50"]
    assert np.median(h) <= med + 1e-12 and med - np.median(h) <= width + 1e-12


def test_binary_ensemble_entropy() -> None:
    p = np.array([[0.5, 0.9], [0.5, 0.7]])  # 2 members x 2 patients
    h = predictive_entropy(p)
    assert h[0] == pytest.approx(math.log(2))
    assert h[1] == pytest.approx(entropy([0.2, 0.8]))
    with pytest.raises(DataError):
        predictive_entropy(np.array([[[0.3, 0.3]]]))


@pytest.mark.parametrize("alpha", [0.05, 0.1, 0.2])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_conformal_quantile_bounds_and_coverage(alpha: float, seed: int) -> None:
    # Prepare: calibration split over 3 sites, independent test data
    rng = np.random.default_rng(seed)
    s_cal, y_cal = scored_labels(rng, 1500)
    parts = split_indices(rng, s_cal.size, 3)
    # Execute
    hist = sum(nonconformity_histogram(nonconformity_scores(s_cal[i], y_cal[i])) for i in parts)
    qhat = conformal_quantile(hist, alpha=alpha)
    # Assert: >= the exact pooled conformal quantile, within one bin width
    nc = np.sort(nonconformity_scores(s_cal, y_cal))
    k = math.ceil((nc.size + 1) * (1 - alpha))
    exact = nc[k - 1]
    width = float(np.diff(conformal_edges())[0])
    assert exact <= qhat <= exact + width + 1e-12
    # Coverage on held-out data, counted at 4 test sites and pooled
    s_te, y_te = scored_labels(rng, 4000)
    counts = sum_stats([coverage_counts(s_te[i], y_te[i], qhat)
                        for i in split_indices(rng, 4000, 4)])
    summ = coverage_summary(counts)
    direct = np.mean(nonconformity_scores(s_te, y_te) <= qhat)
    assert summ["coverage"]["value"] == pytest.approx(direct, abs=1e-15)
    # one calibration draw: coverage within sampling error of 1 - alpha (sd ~ 0.01)
    assert summ["coverage"]["value"] >= 1 - alpha - 0.04


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_conformal_marginal_coverage_at_least_nominal(alpha: float) -> None:
    # The guarantee is marginal over calibration sets: average over 300 repetitions.
    rng = np.random.default_rng(11)
    cover = []
    for _ in range(300):
        s_cal, y_cal = scored_labels(rng, 150)
        halves = [np.arange(70), np.arange(70, 150)]
        hist = sum(nonconformity_histogram(nonconformity_scores(s_cal[i], y_cal[i]))
                   for i in halves)
        qhat = conformal_quantile(hist, alpha=alpha)
        s_te, y_te = scored_labels(rng, 150)
        c = coverage_counts(s_te, y_te, qhat)
        cover.append(c["covered"] / c["n"])
    # Monte Carlo SE of the mean is about 0.002; the exact finite-sample mean is >= 1 - alpha.
    assert np.mean(cover) >= 1 - alpha - 0.006


def test_conformal_small_n_and_validation() -> None:
    h = nonconformity_histogram([0.1, 0.2, 0.3])
    assert conformal_quantile(h, alpha=0.1) == math.inf  # k = ceil(4 * 0.9) = 4 > 3
    assert coverage_counts([0.3, 0.9], [0, 1], math.inf)["set_size_2"] == 2
    with pytest.raises(DataError):
        conformal_quantile(np.zeros(10000))
    with pytest.raises(DataError):
        conformal_quantile([1, -1, 3])
    with pytest.raises(DataError):
        coverage_summary({"n": 3, "covered": 2, "set_size_0": 0, "set_size_1": 1,
                          "set_size_2": 1})
    with pytest.raises(DataError):
        nonconformity_scores([1.2], [1])
