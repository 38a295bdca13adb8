"""Ordinal grading: weighted Cohen's kappa and mean absolute grade error from a confusion matrix.

Grades are the class indices ``0 .. K - 1`` of a :class:`common.stats.multiclass.ConfusionMatrix`
(rows = true grade, columns = predicted grade), equally spaced. The node releases only that
matrix (:func:`common.stats.multiclass.confusion_matrix_counts`); both statistics below are
functions of the pooled matrix, so they equal the computation on the pooled patients exactly.

Weighted kappa (Cohen, Psychol. Bull. 1968; 70:213-220) with agreement weights
``w_ij = 1 - (i - j)^2 / (K - 1)^2`` (quadratic) or ``1 - |i - j| / (K - 1)`` (linear), cell
proportions ``p_ij``, margins ``p_i.`` and ``p_.j``::

    p_o = sum w_ij p_ij,   p_e = sum w_ij p_i. p_.j,   kappa_w = (p_o - p_e) / (1 - p_e)

equal to ``sklearn.metrics.cohen_kappa_score(weights="quadratic" | "linear")``. Its
large-sample (non-null) variance is that of Fleiss, Cohen & Everitt (Psychol. Bull. 1969;
72:323-327), with ``wbar_i. = sum_j p_.j w_ij`` and ``wbar_.j = sum_i p_i. w_ij``::

    Var = [sum_ij p_ij (w_ij - (wbar_i. + wbar_.j)(1 - kappa_w))^2
           - (kappa_w - p_e (1 - kappa_w))^2] / (n (1 - p_e)^2)

(the formula behind ``statsmodels.stats.inter_rater.cohens_kappa(...).var_kappa``, which the
tests check); the interval is Wald, ``kappa_w +- z sqrt(Var)``, clipped to [-1, 1].

Mean absolute grade error ``mean |true - predicted|`` (in grades) comes with a t interval,
``mean +- t_{n-1} s / sqrt(n)`` (s the sample SD of the per-patient errors, exactly known from
the matrix; Student 1908), i.e. a normal-theory interval relying on the central limit theorem
for these few-valued errors.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm, t

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level
from common.stats.estimate import Estimate
from common.stats.multiclass import ConfusionMatrix

__all__ = ["KAPPA_WEIGHTS", "agreement_weights", "mean_absolute_grade_error", "weighted_kappa"]

KAPPA_WEIGHTS = ("quadratic", "linear")


def agreement_weights(n_classes: int, weights: str = "quadratic") -> np.ndarray:
    """``K x K`` agreement weights (1 on the diagonal, 0 for the farthest grades)."""
    if weights not in KAPPA_WEIGHTS:
        raise ConfigError(f"kappa weights must be one of {KAPPA_WEIGHTS}, got {weights!r}")
    g = np.arange(n_classes, dtype=np.float64)
    dist = np.abs(g[:, None] - g[None, :]) / (n_classes - 1)
    return 1.0 - (dist**2 if weights == "quadratic" else dist)


def weighted_kappa(
    cm: ConfusionMatrix, *, weights: str = "quadratic", alpha: float = 0.05
) -> Estimate:
    """Coordinator: weighted Cohen's kappa with the Fleiss-Cohen-Everitt interval.

    Parameters
    ----------
    cm
        Pooled confusion matrix of true (rows) against predicted (columns) grades.
    weights
        ``"quadratic"`` (default; the usual choice for grading) or ``"linear"``.
    alpha
        1 - confidence level.

    Returns
    -------
    Estimate
        Method ``"fleiss-cohen-everitt"``. NaN (value and interval) when ``p_e = 1`` (every
        patient has the same true and the same predicted grade); the interval is NaN with
        fewer than two patients.
    """
    z = float(norm.ppf(1 - alpha_level(alpha) / 2))
    w = agreement_weights(cm.n_classes, weights)
    n = cm.n
    method = "fleiss-cohen-everitt"
    if n == 0:
        raise DataError("the pooled confusion matrix is empty", safe_reason="no data")
    p = cm.counts / n
    pr, pc = p.sum(axis=1), p.sum(axis=0)
    po = float(np.sum(w * p))
    pe = float(pr @ w @ pc)
    if pe >= 1.0 - 1e-15:
        return Estimate(math.nan, math.nan, math.nan, math.nan, n, method)
    kappa = (po - pe) / (1.0 - pe)
    wbar_row = w @ pc  # wbar_i.
    wbar_col = pr @ w  # wbar_.j
    inner = w - (wbar_row[:, None] + wbar_col[None, :]) * (1.0 - kappa)
    var = (float(np.sum(p * inner**2)) - (kappa - pe * (1.0 - kappa)) ** 2) \
        / (n * (1.0 - pe) ** 2)
    if n < 2:
        return Estimate(kappa, math.nan, math.nan, math.nan, n, method)
    se = math.sqrt(max(var, 0.0))
    return Estimate(kappa, max(-1.0, kappa - z * se), min(1.0, kappa + z * se), se, n, method)


def mean_absolute_grade_error(cm: ConfusionMatrix, *, alpha: float = 0.05) -> Estimate:
    """Coordinator: mean ``|true grade - predicted grade|`` with a t interval (method ``"t"``).

    The interval is NaN with fewer than two patients, and of zero width when every error is
    the same (e.g. all grades right).
    """
    a = alpha_level(alpha)
    n = cm.n
    if n == 0:
        raise DataError("the pooled confusion matrix is empty", safe_reason="no data")
    g = np.arange(cm.n_classes, dtype=np.float64)
    err = np.abs(g[:, None] - g[None, :])
    mean = float(np.sum(cm.counts * err)) / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, math.nan, n, "t")
    ss = float(np.sum(cm.counts * (err - mean) ** 2))
    se = math.sqrt(ss / (n - 1) / n)
    q = float(t.ppf(1 - a / 2, n - 1))
    return Estimate(mean, mean - q * se, mean + q * se, se, n, "t")
