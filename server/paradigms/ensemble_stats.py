"""Pooled ensemble measures from the histograms of :mod:`client.queries.ensemble`.

Everything here reads counts summed over hospitals, never a patient's value. Scores are
known to their bin of ``B`` equal bins on [0, 1], uncertainties to theirs on ``U`` bins:

* AUC: Mann-Whitney from the class histograms (:func:`common.stats.histogram.
  auc_from_histograms`; ties within a bin count one half). Its DeLong interval
  (:func:`auc_estimate`) needs no second round: on binned scores a patient's placement value
  depends only on its bin and the pooled histograms, so the placement variances are sums over
  bins.
* ECE: ``calibration_bins`` equal bins, each bin's mean score taken at its fine bins'
  centres (error at most half a fine bin), ``sum_b n_b/n |positives_b/n_b - mean score_b|``.
* Error-detection AUROC: the AUC of the uncertainty histogram of the misclassified patients
  against that of the rightly classified ones (higher uncertainty flags an error).
* Split-conformal prediction sets ``{c : 1 - p(c) <= qhat}`` (Vovk et al. 2005; binary
  nonconformity as in :mod:`common.stats.conformal`), with every nonconformity score rounded
  up to its bin's upper edge: ``qhat`` from the validation patients' pooled histogram
  (:func:`common.stats.conformal.conformal_quantile`), coverage and set sizes on the test
  patients' histograms. Rounding up keeps the coverage guarantee.
* Member weights for ``combine=weighted``: ``max(AUC_i - 0.5, 0.01)``, normalised.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from common.stats.auc import auc_ci
from common.stats.conformal import conformal_quantile, coverage_summary
from common.stats.histogram import auc_from_histograms

__all__ = ["accuracy", "auc", "auc_estimate", "conformal_qhat", "coverage", "ece", "error_auroc",
           "member_weights", "youden_threshold"]

EPS_EDGE = 1e-9


def _hist(class_hist: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    h = np.maximum(np.rint(np.asarray(class_hist, dtype=np.float64)), 0)
    return h[0], h[1]


def auc(class_hist: npt.ArrayLike) -> float:
    """Pooled AUC from a ``(2, B)`` histogram (positives, negatives)."""
    pos, neg = _hist(class_hist)
    return auc_from_histograms(pos, neg)


def auc_estimate(class_hist: npt.ArrayLike, *, alpha: float = 0.05) -> dict[str, Any]:
    """Pooled AUC with its DeLong interval on the binned scores of a ``(2, B)`` histogram.

    Returns ``{"value", "lower", "upper", "se", "n", "method": "delong"}`` (None where
    undefined: a class with fewer than two patients).
    """
    pos, neg = _hist(class_hist)
    m, n = pos.sum(), neg.sum()
    if m < 2 or n < 2:
        return {"value": auc(class_hist) if m and n else None, "lower": None, "upper": None,
                "se": None, "n": int(m + n), "method": "delong"}
    neg_below = np.cumsum(neg) - neg
    pos_above = m - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n  # a positive's placement among the negatives
    v01 = (pos_above + 0.5 * pos) / m  # a negative's placement among the positives
    value = float(np.sum(pos * v10) / m)
    s10 = float(np.sum(pos * (v10 - value) ** 2) / (m - 1))
    s01 = float(np.sum(neg * (v01 - value) ** 2) / (n - 1))
    est = auc_ci(value, s10 / m + s01 / n, n=int(m + n), alpha=alpha)
    return {"value": est.value, "lower": est.lower, "upper": est.upper, "se": est.se,
            "n": int(m + n), "method": "delong"}


def _edge_index(bins: int, threshold: float) -> int:
    """The bin index ``j`` with ``j / bins == threshold`` rounded to the nearest edge: scores in
    bins ``j, j+1, ...`` are at or above the threshold."""
    return int(min(max(round(float(threshold) * bins), 0), bins))


def accuracy(class_hist: npt.ArrayLike, threshold: float = 0.5) -> float:
    """Accuracy when a score at or above ``threshold`` (a bin edge: ``j / B``) is called
    positive; the default 0.5 is an edge for an even ``B``."""
    pos, neg = _hist(class_hist)
    j = _edge_index(pos.size, threshold)
    n = pos.sum() + neg.sum()
    return float((pos[j:].sum() + neg[:j].sum()) / n) if n else math.nan


def youden_threshold(class_hist: npt.ArrayLike) -> float:
    """Youden's operating threshold of a ``(2, B)`` histogram (positives, negatives):
    :func:`common.stats.histogram.youden_threshold` on its counts."""
    from common.stats.histogram import youden_threshold as youden

    return youden(*_hist(class_hist))


def ece(class_hist: npt.ArrayLike, *, calibration_bins: int = 10) -> float:
    """Expected calibration error on ``calibration_bins`` equal bins (``B`` a multiple)."""
    pos, neg = _hist(class_hist)
    bins = pos.size
    if bins % calibration_bins:
        raise ValueError(f"{bins} score bins do not group into {calibration_bins}")
    centres = (np.arange(bins) + 0.5) / bins
    count = (pos + neg).reshape(calibration_bins, -1)
    score_sum = ((pos + neg) * centres).reshape(calibration_bins, -1).sum(axis=1)
    n_b = count.sum(axis=1)
    n = n_b.sum()
    if n == 0:
        return math.nan
    ok = n_b > 0
    acc = pos.reshape(calibration_bins, -1).sum(axis=1)[ok] / n_b[ok]
    conf = score_sum[ok] / n_b[ok]
    return float(np.sum(n_b[ok] / n * np.abs(acc - conf)))


def error_auroc(error_hist: npt.ArrayLike) -> float:
    """AUROC of uncertainty for detecting errors from a ``(2, U)`` (wrong, right) histogram."""
    wrong, right = _hist(error_hist)
    return auc_from_histograms(wrong, right)


def nonconformity_hist(class_hist: npt.ArrayLike) -> np.ndarray:
    """Histogram of ``1 - p(true class)`` on the same equal bins."""
    pos, neg = _hist(class_hist)
    return pos[::-1] + neg


def conformal_qhat(class_hist: npt.ArrayLike, *, alpha: float) -> float:
    """Split-conformal threshold from the calibration patients' ``(2, B)`` histogram."""
    h = nonconformity_hist(class_hist)
    return conformal_quantile(h, alpha=alpha, edges=np.linspace(0.0, 1.0, h.size + 1))


def coverage(class_hist: npt.ArrayLike, qhat: float) -> dict[str, Any]:
    """Coverage and set sizes of the prediction sets at ``qhat`` on a ``(2, B)`` histogram.

    A patient in score bin ``j`` (``[e_j, e_{j+1})``) has rounded-up nonconformity
    ``e_{j+1}`` for class 0 and ``1 - e_j`` for class 1.
    """
    pos, neg = _hist(class_hist)
    edges = np.linspace(0.0, 1.0, pos.size + 1)
    in0 = edges[1:] <= qhat + EPS_EDGE
    in1 = 1.0 - edges[:-1] <= qhat + EPS_EDGE
    size = in0.astype(int) + in1.astype(int)
    total = pos + neg
    counts = {"n": int(total.sum()), "covered": int(pos[in1].sum() + neg[in0].sum()),
              **{f"set_size_{s}": int(total[size == s].sum()) for s in range(3)}}
    return coverage_summary(counts)


def member_weights(member_hists: npt.ArrayLike) -> np.ndarray:
    """Weights ``max(AUC_i - 0.5, 0.01)`` (normalised) from ``(M, 2, B)`` validation histograms."""
    aucs = np.array([auc(h) for h in np.asarray(member_hists)])
    raw = np.maximum(np.nan_to_num(aucs - 0.5, nan=0.0), 0.01)
    return raw / raw.sum()
