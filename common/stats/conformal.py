"""Split conformal prediction with a pooled quantile from summed histograms.

Calibration (pass 1): each node computes, for its calibration patients, the nonconformity
score ``s = 1 - p(true class)`` (:func:`nonconformity_scores`) and releases its histogram on
fixed fine edges (:func:`nonconformity_histogram`). The coordinator adds the histograms and
computes (:func:`conformal_quantile`) the split-conformal threshold at level ``1 - alpha``
(Vovk et al. 2005; Lei et al., JASA 2018; Angelopoulos & Bates 2021): the
``k = ceil((n + 1)(1 - alpha))``-th smallest pooled score, which guarantees marginal coverage
``>= 1 - alpha`` for exchangeable data. From a histogram the k-th smallest score is only known
to lie in some bin; we return that bin's *upper* edge, which is ``>=`` the exact quantile and
within one bin width of it, so the guarantee is kept (conservatively). If ``k > n`` the
threshold is ``+inf`` (every class is always in the set).

Evaluation (pass 2): the coordinator sends the threshold; each node releases the counts of
covered test patients and of prediction-set sizes (:func:`coverage_counts`);
:func:`coverage_summary` gives the pooled empirical coverage with a Wilson interval.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import DataError
from common.stats._checks import alpha_level, as_labels, as_scores, counts_array, require_keys
from common.stats.bins import check_edges, uniform_edges, value_histogram
from common.stats.estimate import Estimate
from common.stats.metrics import proportion_ci

CONFORMAL_BINS = 10000
COVERAGE_KEYS = ("n", "covered", "set_size_0", "set_size_1", "set_size_2")


def conformal_edges(bins: int = CONFORMAL_BINS) -> np.ndarray:
    """Default fixed edges for nonconformity scores on [0, 1] (width 1e-4)."""
    return uniform_edges(bins, 0.0, 1.0)


def nonconformity_scores(scores: npt.ArrayLike, labels: npt.ArrayLike) -> np.ndarray:
    """Binary-classifier nonconformity ``1 - p(true class)`` (``scores`` = P(positive))."""
    s = as_scores(scores)
    if np.any((s < 0) | (s > 1)):
        raise DataError("scores must be probabilities in [0, 1]",
                        safe_reason="invalid statistics input")
    y = as_labels(labels, s.size)
    return np.where(y, 1.0 - s, s)


def nonconformity_histogram(
    nonconformity: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> np.ndarray:
    """Node-side counts of nonconformity scores per fixed bin (additive over nodes)."""
    e = conformal_edges() if edges is None else check_edges(edges)
    return value_histogram(nonconformity, e)


def conformal_quantile(
    hist: npt.ArrayLike, *, alpha: float = 0.1, edges: npt.ArrayLike | None = None
) -> float:
    """Pooled split-conformal threshold: upper edge of the bin of the k-th smallest score.

    ``k = ceil((n + 1)(1 - alpha))``; returns ``inf`` when ``k > n``.
    """
    a = alpha_level(alpha)
    h = counts_array(hist, "hist")
    e = conformal_edges(h.size) if edges is None else check_edges(edges)
    if e.size - 1 != h.size:
        raise DataError("edges do not match the histogram", safe_reason="invalid statistics input")
    n = int(h.sum())
    if n == 0:
        raise DataError("empty calibration histogram", safe_reason="no data")
    # Guard the float product against rounding just above an integer, e.g. 0.9 * 10.
    k = math.ceil(round((n + 1) * (1 - a), 9))
    if k > n:
        return math.inf
    b = int(np.searchsorted(np.cumsum(h), k))  # first bin whose cumulative count reaches k
    return float(e[b + 1])


def coverage_counts(
    scores: npt.ArrayLike, labels: npt.ArrayLike, qhat: float
) -> dict[str, int]:
    """Node-side coverage of the conformal sets ``{c : 1 - p(c) <= qhat}`` on test patients.

    Returns
    -------
    dict
        ``n``, ``covered`` (true class in the set), ``set_size_0/1/2`` (patients whose set has
        0, 1 or 2 classes).
    """
    s = as_scores(scores)
    if np.any((s < 0) | (s > 1)):
        raise DataError("scores must be probabilities in [0, 1]",
                        safe_reason="invalid statistics input")
    y = as_labels(labels, s.size)
    if math.isnan(qhat):
        raise DataError("qhat must be a number", safe_reason="invalid statistics input")
    in_pos = (1.0 - s) <= qhat
    in_neg = s <= qhat
    size = in_pos.astype(int) + in_neg.astype(int)
    covered = np.where(y, in_pos, in_neg)
    return {"n": int(s.size), "covered": int(covered.sum()),
            "set_size_0": int(np.sum(size == 0)), "set_size_1": int(np.sum(size == 1)),
            "set_size_2": int(np.sum(size == 2))}


def coverage_summary(counts: Mapping[str, Any], *, alpha: float = 0.05) -> dict[str, Any]:
    """Pooled empirical coverage (Wilson interval at ``1 - alpha``) and mean set size."""
    require_keys(counts, COVERAGE_KEYS, "coverage counts")
    n = int(counts["n"])
    sizes = counts_array([counts["set_size_0"], counts["set_size_1"], counts["set_size_2"]],
                         "set sizes")
    if int(sizes.sum()) != n:
        raise DataError("set-size counts do not add up to n",
                        safe_reason="invalid statistics input")
    cov: Estimate = proportion_ci(int(counts["covered"]), n, alpha=alpha, method="wilson")
    mean_size = float(np.dot(sizes, [0, 1, 2]) / n) if n else math.nan
    return {"coverage": cov.as_dict(), "mean_set_size": mean_size,
            "set_sizes": {str(i): int(v) for i, v in enumerate(sizes)}}
