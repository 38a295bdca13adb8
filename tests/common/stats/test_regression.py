"""Regression: pooled sums give sklearn's / numpy's / SciPy's numbers on the pooled patients."""

from __future__ import annotations

import math

import numpy as np
import pytest
from flwr.app import MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import pearsonr
from scipy.stats import t as student_t
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score
from statsmodels.stats.weightstats import DescrStatsW

from common.errors import DataError
from common.stats._records import merge_all
from common.stats.regression import (
    RegressionSums,
    abs_error_quantile,
    regression_metrics,
    regression_node_stats,
)
from tests.common.stats.sites import split_indices


def bone_ages(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Targets around 120 months and predictions with a bias and heavy-ish tails."""
    y = rng.normal(120.0, 30.0, size=n)
    return y, 0.9 * y + 14.0 + rng.standard_t(5, size=n) * 8.0


def federated(y: np.ndarray, p: np.ndarray, parts: list[np.ndarray], *, upper: float = 60.0,
              bins: int = 600) -> RegressionSums:
    return merge_all(regression_node_stats(y[i], p[i], abs_error_upper=upper, bins=bins)
                     for i in parts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_match_sklearn_scipy_and_statsmodels_on_pooled_data(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y, p = bone_ages(rng, 500)
    parts = split_indices(rng, y.size, 3 + seed)
    # Execute
    res = regression_metrics(federated(y, p, parts), alpha=0.1)
    # Assert
    e = p - y
    assert res.n == y.size
    assert res.mae.value == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert res.mse == pytest.approx(mean_squared_error(y, p), rel=1e-12)
    assert res.rmse == pytest.approx(math.sqrt(mean_squared_error(y, p)), rel=1e-12)
    assert res.r2 == pytest.approx(r2_score(y, p), rel=1e-10)
    ref_r = pearsonr(y, p)
    ci = ref_r.confidence_interval(confidence_level=0.9)
    assert (res.pearson_r.value, res.pearson_r.lower, res.pearson_r.upper) == pytest.approx(
        (ref_r.statistic, ci.low, ci.high), rel=1e-9)
    assert (res.mae.lower, res.mae.upper) == pytest.approx(
        DescrStatsW(np.abs(e)).tconfint_mean(alpha=0.1), rel=1e-10)
    assert (res.bias.value, res.bias.lower, res.bias.upper) == pytest.approx(
        (e.mean(), *DescrStatsW(e).tconfint_mean(alpha=0.1)), rel=1e-10, abs=1e-10)
    s = e.std(ddof=1)
    assert res.sd_difference == pytest.approx(s, rel=1e-10)
    q = student_t.ppf(0.95, y.size - 1)
    se = s * math.sqrt(1 / y.size + 1.96**2 / (2 * (y.size - 1)))
    for est, lim in ((res.loa_lower, e.mean() - 1.96 * s), (res.loa_upper, e.mean() + 1.96 * s)):
        assert (est.value, est.lower, est.upper) == pytest.approx(
            (lim, lim - q * se, lim + q * se), rel=1e-10)


def test_limits_of_agreement_intervals_cover_at_about_the_nominal_rate() -> None:
    # Prepare: 4000 studies of 40 normal differences, true upper limit mu + 1.96 sigma
    rng = np.random.default_rng(11)
    d = rng.normal(2.0, 5.0, size=(4000, 40))
    truth = 2.0 + 1.96 * 5.0
    # Execute
    covered = []
    for row in d:
        res = regression_metrics(regression_node_stats(np.zeros(40), row, abs_error_upper=50.0,
                                                       bins=10))
        covered.append(res.loa_upper.lower <= truth <= res.loa_upper.upper)
    # Assert: Bland & Altman's approximation is close to 95 % at n = 40
    assert np.mean(covered) == pytest.approx(0.95, abs=0.02)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(-50, 50), st.floats(-50, 50)), min_size=1, max_size=40),
       st.lists(st.integers(0, 3), min_size=40, max_size=40))
def test_merging_sites_equals_the_union(pairs: list[tuple[float, float]],
                                        site_of: list[int]) -> None:
    # Prepare
    y, p = (np.array(v) for v in zip(*pairs, strict=True))
    site = np.array(site_of[: y.size])
    # Execute
    merged = merge_all(regression_node_stats(y[site == s], p[site == s], abs_error_upper=40.0,
                                             bins=16) for s in range(4) if np.any(site == s))
    union = regression_node_stats(y, p, abs_error_upper=40.0, bins=16)
    # Assert
    np.testing.assert_array_equal(merged.abs_error_hist, union.abs_error_hist)
    assert merged.n == union.n and merged.abs_error_overflow == union.abs_error_overflow
    for name in RegressionSums._SUMS:
        assert getattr(merged, name) == pytest.approx(getattr(union, name), rel=1e-9, abs=1e-9)
    back = RegressionSums.from_record(dict(MetricRecord(merged.to_record())))
    assert back.to_record() == merged.to_record()


@pytest.mark.parametrize("q", [0.25, 0.5, 0.9])
def test_abs_error_quantile_brackets_the_pooled_order_statistic(q: float) -> None:
    # Prepare
    rng = np.random.default_rng(4)
    y, p = bone_ages(rng, 777)
    stats = federated(y, p, split_indices(rng, y.size, 3), upper=30.0, bins=300)
    # Execute
    res = abs_error_quantile(stats, q)
    # Assert
    ref = np.quantile(np.abs(p - y), q, method="inverted_cdf")
    assert res.lower <= ref < res.upper and res.upper - res.lower == pytest.approx(0.1)


def test_quantile_beyond_the_histogram_is_unbounded_and_degenerate_data() -> None:
    # Errors all above the histogram: the median is only known to exceed its upper edge
    far = regression_node_stats([0.0, 0.0, 0.0], [10.0, 11.0, 12.0], abs_error_upper=5.0)
    assert abs_error_quantile(far).lower == 5.0 and math.isinf(abs_error_quantile(far).upper)
    # Constant targets: R^2 and r undefined; one patient: no intervals
    flat = regression_metrics(regression_node_stats([3.0, 3.0, 3.0], [2.0, 3.0, 4.5],
                                                    abs_error_upper=5.0))
    assert math.isnan(flat.r2) and math.isnan(flat.pearson_r.value)
    one = regression_metrics(regression_node_stats([1.0], [2.0], abs_error_upper=5.0))
    assert one.mae.value == 1.0 and math.isnan(one.mae.lower) and math.isnan(one.loa_upper.value)
    assert one.as_dict()["loa_upper"]["value"] is None


def test_bad_input_is_refused() -> None:
    a = regression_node_stats([1.0, 2.0], [1.5, 2.5], abs_error_upper=5.0)
    b = regression_node_stats([1.0, 2.0], [1.5, 2.5], abs_error_upper=6.0)
    with pytest.raises(DataError, match="different"):
        a + b
    with pytest.raises(DataError, match="length"):
        regression_node_stats([1.0, 2.0], [1.0], abs_error_upper=5.0)
    with pytest.raises(DataError, match="NaN"):
        regression_node_stats([1.0, np.nan], [1.0, 2.0], abs_error_upper=5.0)
    record = a.to_record()
    record["n"] = 3  # the histogram no longer counts every patient
    with pytest.raises(DataError, match="every patient"):
        RegressionSums.from_record(record)
