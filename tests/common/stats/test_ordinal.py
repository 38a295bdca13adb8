"""Ordinal grading: weighted kappa and mean absolute grade error from pooled confusion matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import cohen_kappa_score
from statsmodels.stats.inter_rater import cohens_kappa
from statsmodels.stats.weightstats import DescrStatsW

from common.errors import ConfigError
from common.stats._records import merge_all
from common.stats.multiclass import ConfusionMatrix, confusion_matrix_counts
from common.stats.ordinal import agreement_weights, mean_absolute_grade_error, weighted_kappa
from tests.common.stats.sites import split_indices


def graded(rng: np.random.Generator, n: int, k: int, *, noise: float = 0.8) -> tuple[np.ndarray,
                                                                                   np.ndarray]:
    """True grades and predictions off by a rounded normal error, clipped to the scale."""
    y = rng.integers(0, k, size=n)
    pred = np.clip(np.rint(y + rng.normal(scale=noise, size=n)), 0, k - 1).astype(int)
    return y, pred


@pytest.mark.parametrize("weights", ["quadratic", "linear"])
@pytest.mark.parametrize(("seed", "k"), [(0, 4), (1, 5), (2, 3)])
def test_weighted_kappa_matches_sklearn_and_statsmodels(weights: str, seed: int, k: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y, pred = graded(rng, 700, k)
    parts = split_indices(rng, y.size, 3)
    # Execute
    cm = merge_all(confusion_matrix_counts(y[i], pred[i], n_classes=k) for i in parts)
    res = weighted_kappa(cm, weights=weights, alpha=0.05)
    # Assert: estimate as sklearn; variance as statsmodels (Fleiss-Cohen-Everitt, as SAS)
    assert res.value == pytest.approx(cohen_kappa_score(y, pred, weights=weights), abs=1e-12)
    ref = cohens_kappa(cm.counts, wt=weights)
    assert res.value == pytest.approx(ref.kappa, abs=1e-12)
    assert res.se ** 2 == pytest.approx(ref.var_kappa, rel=1e-9)
    z = norm.ppf(0.975)
    assert (res.lower, res.upper) == pytest.approx(
        (res.value - z * res.se, res.value + z * res.se), abs=1e-12)
    assert res.method == "fleiss-cohen-everitt" and res.n == 700


@pytest.mark.parametrize("seed", [3, 4])
def test_kappa_standard_error_agrees_with_a_multinomial_bootstrap(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    y, pred = graded(rng, 500, 5, noise=1.0)
    cm = confusion_matrix_counts(y, pred, n_classes=5)
    res = weighted_kappa(cm)
    # Execute: 4000 resampled confusion matrices, quadratic kappa of each
    tables = rng.multinomial(cm.n, cm.counts.ravel() / cm.n, size=4000).reshape(-1, 5, 5)
    w = agreement_weights(5)
    p = tables / cm.n
    po = np.einsum("ij,bij->b", w, p)
    pe = np.einsum("ij,bi,bj->b", w, p.sum(axis=2), p.sum(axis=1))
    boot = (po - pe) / (1 - pe)
    # Assert: the large-sample SE is within 10 % of the bootstrap SD
    assert res.se == pytest.approx(boot.std(ddof=1), rel=0.1)


def test_mean_absolute_grade_error_matches_numpy_and_a_t_interval() -> None:
    # Prepare
    rng = np.random.default_rng(5)
    y, pred = graded(rng, 300, 5, noise=1.2)
    parts = split_indices(rng, y.size, 4)
    # Execute
    cm = merge_all(confusion_matrix_counts(y[i], pred[i], n_classes=5) for i in parts)
    res = mean_absolute_grade_error(cm, alpha=0.1)
    # Assert
    err = np.abs(y - pred).astype(float)
    assert res.value == pytest.approx(err.mean(), abs=1e-14)
    lo, hi = DescrStatsW(err).tconfint_mean(alpha=0.1)
    assert (res.lower, res.upper) == pytest.approx((lo, hi), abs=1e-12)
    assert res.se == pytest.approx(err.std(ddof=1) / math.sqrt(err.size), rel=1e-12)


def test_degenerate_tables() -> None:
    # Perfect agreement: kappa 1; every error 0: a zero-width interval
    perfect = ConfusionMatrix(counts=np.diag([5, 3, 4]))
    assert weighted_kappa(perfect).value == pytest.approx(1.0)
    mage = mean_absolute_grade_error(perfect)
    assert (mage.value, mage.lower, mage.upper) == (0.0, 0.0, 0.0)
    # Everyone in one grade by both raters: chance agreement 1, kappa undefined
    one = ConfusionMatrix(counts=[[0, 0], [0, 9]])
    assert math.isnan(weighted_kappa(one).value)
    # Predictions opposite to the truth: kappa -1 (quadratic, two grades)
    opposite = ConfusionMatrix(counts=[[0, 5], [5, 0]])
    assert weighted_kappa(opposite).value == pytest.approx(-1.0)
    assert weighted_kappa(opposite).lower >= -1.0
    with pytest.raises(ConfigError):
        weighted_kappa(perfect, weights="cubic")
