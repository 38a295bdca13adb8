"""Confusion counts summed over sites give the pooled metrics and statsmodels' intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score
from statsmodels.stats.proportion import proportion_confint

from common.errors import ConfigError, DataError
from common.stats import sum_stats
from common.stats.metrics import classification_metrics, confusion_counts, f1_ci, proportion_ci
from tests.common.stats.sites import scored_labels, split_indices


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("method", ["wilson", "beta"])
def test_pooled_metrics_equal_pooled_data(seed: int, method: str) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    s, y = scored_labels(rng, 700)
    parts = split_indices(rng, s.size, 4)
    # Execute
    pooled = sum_stats([confusion_counts(s[i], y[i], threshold=0.45) for i in parts])
    m = classification_metrics(pooled, method=method)
    # Assert: point estimates equal sklearn on the pooled data
    pred = (s >= 0.45).astype(int)
    assert m["accuracy"].value == pytest.approx(accuracy_score(y, pred), abs=1e-15)
    assert m["sensitivity"].value == pytest.approx(recall_score(y, pred), abs=1e-15)
    assert m["specificity"].value == pytest.approx(recall_score(1 - y, 1 - pred), abs=1e-15)
    assert m["precision"].value == pytest.approx(precision_score(y, pred), abs=1e-15)
    assert m["f1"].value == pytest.approx(f1_score(y, pred), abs=1e-15)
    # ...and the intervals equal statsmodels on the pooled counts
    tp = int(np.sum((pred == 1) & (y == 1)))
    lo, hi = proportion_confint(tp, int(y.sum()), alpha=0.05, method=method)
    assert (m["sensitivity"].lower, m["sensitivity"].upper) == pytest.approx((lo, hi), abs=1e-12)
    lo, hi = proportion_confint(int(np.sum(pred == y)), y.size, method=method)
    assert (m["accuracy"].lower, m["accuracy"].upper) == pytest.approx((lo, hi), abs=1e-12)


def test_wilson_matches_closed_form() -> None:
    # Independent of statsmodels: Wilson's formula written out.
    k, n, z = 37, 120, norm.ppf(0.975)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    est = proportion_ci(k, n, method="wilson")
    assert (est.lower, est.upper) == pytest.approx((centre - half, centre + half), abs=1e-12)


def test_f1_delta_variance_matches_numeric_gradient() -> None:
    # Prepare: multinomial cell probabilities for (tp, fp, fn, tn)
    tp, fp, fn, tn = 80, 25, 30, 165
    n = tp + fp + fn + tn
    p = np.array([tp, fp, fn, tn]) / n

    def f1(q: np.ndarray) -> float:
        return 2 * q[0] / (2 * q[0] + q[1] + q[2])

    eps = 1e-7
    grad = np.array([(f1(p + eps * np.eye(4)[j]) - f1(p - eps * np.eye(4)[j])) / (2 * eps)
                     for j in range(4)])
    var = grad @ (np.diag(p) - np.outer(p, p)) @ grad / n
    # Execute
    est = f1_ci(tp, fp, fn, tn)
    # Assert
    assert est.se == pytest.approx(math.sqrt(var), rel=1e-6)
    assert est.lower < est.value < est.upper
    lg = math.log(est.value / (1 - est.value))
    assert math.log(est.upper / (1 - est.upper)) - lg == pytest.approx(
        lg - math.log(est.lower / (1 - est.lower)), rel=1e-9)


def test_f1_interval_covers_in_simulation() -> None:
    rng = np.random.default_rng(5)
    probs = np.array([0.25, 0.08, 0.1, 0.57])
    true_f1 = 2 * probs[0] / (2 * probs[0] + probs[1] + probs[2])
    draws = rng.multinomial(400, probs, size=600)
    hits = sum(f1_ci(*d).lower <= true_f1 <= f1_ci(*d).upper for d in draws)
    assert 0.92 <= hits / len(draws) <= 0.98


def test_empty_denominator_gives_nan_and_bad_counts_raise() -> None:
    m = classification_metrics({"tp": 0, "fp": 0, "tn": 5, "fn": 0})
    assert math.isnan(m["sensitivity"].value) and math.isnan(m["precision"].value)
    assert m["specificity"].value == 1.0
    with pytest.raises(DataError):
        classification_metrics({"tp": -1, "fp": 0, "tn": 5, "fn": 0})
    with pytest.raises(DataError):
        classification_metrics({"tp": 1, "fp": 0, "tn": 5})
    with pytest.raises(ConfigError):
        proportion_ci(3, 2)
    with pytest.raises(ConfigError):
        proportion_ci(1, 2, method="wald")
    with pytest.raises(DataError):
        confusion_counts([0.1, 0.2], [1])
    with pytest.raises(DataError):
        confusion_counts([0.1, float("nan")], [1, 0])
    with pytest.raises(DataError):
        confusion_counts([0.1, 0.2], [1, 2])
