"""Per-class score histograms on fixed bins: a mergeable sufficient statistic for ROC/AUC.

A node releases, for its held-out patients, the count of positive-class and negative-class
scores in each of ``bins`` equal-width bins on [0, 1]. Histograms from several nodes add up,
and the AUC (Mann-Whitney statistic) of the pooled scores follows from the summed histograms,
counting a positive and a negative in the same bin as a tie (1/2). This equals the AUC of
the pooled scores exactly when every score sits on its bin's representative value, and
differs from it by at most the fraction of positive/negative pairs that share a bin otherwise.

Written here because no library offers a histogram-based, mergeable AUC.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

DEFAULT_BINS = 1000


def score_histograms(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    bins: int = DEFAULT_BINS,
    edges: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Return (positive counts, negative counts) of ``scores`` in ``bins`` bins on [0, 1].

    Bin ``i`` holds scores in ``[i / bins, (i + 1) / bins)``; a score of exactly 1.0 falls in
    the last bin. Scores outside [0, 1] are clipped.

    If ``edges`` is given (e.g. :func:`common.stats.bins.fine_score_edges`, the default for
    pooled inference), ``bins`` is ignored and the histograms are taken on those edges by
    :func:`common.stats.bins.class_histograms`.
    """
    if edges is not None:
        from common.stats.bins import class_histograms

        return class_histograms(scores, labels, edges)
    s = np.clip(np.asarray(scores, dtype=np.float64).ravel(), 0.0, 1.0)
    y = np.asarray(labels).ravel().astype(bool)
    if s.shape != y.shape:
        raise ValueError("scores and labels must have the same length")
    # Round first so that a score on a bin edge (k / bins) lands in bin k despite float error.
    idx = np.minimum(np.floor(np.round(s * bins, 9)).astype(np.int64), bins - 1)
    pos = np.bincount(idx[y], minlength=bins).astype(np.int64)
    neg = np.bincount(idx[~y], minlength=bins).astype(np.int64)
    return pos, neg


def auc_from_histograms(positive: npt.ArrayLike, negative: npt.ArrayLike) -> float:
    """AUC-ROC (Mann-Whitney U / (n_pos n_neg)) from per-class bin counts.

    NaN if a class is empty. Any fixed edges work (only the order of the bins matters).
    """
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives in strictly lower bins
    wins = float(np.sum(pos * neg_below) + 0.5 * np.sum(pos * neg))
    return wins / float(n_pos * n_neg)


def compress_histograms(
    positive: npt.ArrayLike, negative: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """Drop bins empty in both classes (order kept): same AUC and ROC, far fewer numbers.

    Meant for reports and plots (fine histograms have 10,000 bins, mostly empty); node
    releases keep the fixed bins so that they add up across nodes.
    """
    pos = np.asarray(positive, dtype=np.int64)
    neg = np.asarray(negative, dtype=np.int64)
    if pos.ndim != 1 or pos.shape != neg.shape:
        raise ValueError("positive and negative histograms must be 1-D of the same length")
    keep = (pos > 0) | (neg > 0)
    return pos[keep], neg[keep]


def youden_threshold(positive: npt.ArrayLike, negative: npt.ArrayLike) -> float:
    """The bin edge ``j / B`` (scores in bins ``j, j+1, ...`` called positive) maximising
    sensitivity + specificity - 1 (Youden's J) over per-bin counts or weights of the positive
    and the negative cases on ``B`` equal bins of [0, 1]; 0.5 when a class has no weight.
    Ties: the edge nearest 0.5."""
    pos = np.asarray(positive, dtype=np.float64)
    neg = np.asarray(negative, dtype=np.float64)
    m, n, bins = pos.sum(), neg.sum(), pos.size
    if m <= 0 or n <= 0:
        return 0.5
    sens = np.concatenate([np.cumsum(pos[::-1])[::-1], [0.0]]) / m
    spec = np.concatenate([[0.0], np.cumsum(neg)]) / n
    j_stat = sens + spec - 1.0
    best = np.flatnonzero(j_stat >= j_stat.max() - 1e-12)
    return float(best[np.argmin(np.abs(best - bins / 2))] / bins)
