"""Decision threshold (operating point) from pooled per-class score histograms.

A classifier's probabilities become decisions at a threshold: a patient is called positive
when ``score >= threshold``. The threshold is chosen on *validation* patients (never the test
patients whose metrics are then reported), from the per-class score histograms the nodes
release (:func:`common.stats.bins.class_histograms`, summed over nodes). On fixed edges the
only thresholds that matter are bin edges: predicting positive from bin ``t`` upwards
(``threshold = edges[t]``) gives

    tp(t) = sum(pos[t:]),  fn(t) = sum(pos[:t]),  fp(t) = sum(neg[t:]),  tn(t) = sum(neg[:t]),

which are exactly the confusion counts of the pooled scores at ``edges[t]``. Two rules:

``"youden"``
    Maximise Youden's J = sensitivity + specificity - 1 (Youden, Cancer 1950; 3:32-35), the
    point of the ROC curve farthest above the chance diagonal. Ties go to the highest
    threshold, as ``numpy.argmax`` over ``sklearn.metrics.roc_curve``'s decreasing
    thresholds does.
``"target-sensitivity"``
    The highest threshold whose validation sensitivity is at least the operator's target
    ``S`` (the most specific rule that finds at least ``S`` of the diseased patients), e.g. a
    screening setting that must miss few cases.

Any threshold between the last occupied bin below the cut and the first occupied bin above
it gives the same validation counts. :func:`choose_operating_point` returns the middle edge
of that empty stretch (by edge index: the fine edges are equally spaced in probability near
0.5 and on the logit scale near 0 and 1), so that the threshold sits between the validation
patients rather than on one of them. The result equals the same rule applied to
``sklearn.metrics.roc_curve`` on the pooled validation scores, up to bin resolution: the
confusion counts at the chosen threshold are those at sklearn's threshold whenever no bin
holds scores on both sides of that threshold (the tests check this).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError, DataError
from common.stats._checks import counts_array
from common.stats.bins import check_edges

__all__ = ["OPERATING_METHODS", "OperatingPoint", "choose_operating_point", "cut_counts"]

OPERATING_METHODS = ("youden", "target-sensitivity")


@dataclass(frozen=True)
class OperatingPoint:
    """A decision threshold and the validation counts it gives.

    Attributes
    ----------
    method : str
        ``"youden"`` or ``"target-sensitivity"``.
    threshold : float
        Predict positive when ``score >= threshold`` (a bin edge).
    cut : int
        Index of ``threshold`` in the edges (bins ``cut..`` are predicted positive).
    sensitivity, specificity, youden_j : float
        On the histograms the threshold was chosen from.
    tp, fp, tn, fn : int
        Their confusion counts at ``threshold``.
    target_sensitivity : float or None
        The operator's target (``"target-sensitivity"`` only).
    """

    method: str
    threshold: float
    cut: int
    sensitivity: float
    specificity: float
    youden_j: float
    tp: int
    fp: int
    tn: int
    fn: int
    target_sensitivity: float | None = None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def cut_counts(
    positive: npt.ArrayLike, negative: npt.ArrayLike
) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives for every cut ``t = 0 .. len(bins)`` (bins ``t..`` positive).

    Returns
    -------
    tuple of numpy.ndarray
        ``tp[t]`` and ``fp[t]`` (int64, length ``bins + 1``; ``tp[0]`` = all positives,
        ``tp[bins]`` = 0).
    """
    pos = counts_array(positive, "positive histogram")
    neg = counts_array(negative, "negative histogram")
    if pos.shape != neg.shape:
        raise DataError("per-class histograms differ in length",
                        safe_reason="invalid statistics input")
    tail = np.concatenate([np.cumsum(pos[::-1])[::-1], [0]])
    tail_neg = np.concatenate([np.cumsum(neg[::-1])[::-1], [0]])
    return tail.astype(np.int64), tail_neg.astype(np.int64)


def _middle_of_gap(pos: np.ndarray, neg: np.ndarray, cut: int) -> int:
    """The middle cut among those with the same counts as ``cut`` (empty bins around it)."""
    occupied = (pos + neg) > 0
    lo = cut
    while lo > 0 and not occupied[lo - 1]:
        lo -= 1
    hi = cut
    while hi < occupied.size and not occupied[hi]:
        hi += 1
    # Cuts lo..hi all give the same counts; keep 0 and len(bins) (all / none positive) only
    # when the whole stretch reaches them.
    return (lo + hi) // 2


def choose_operating_point(
    positive: npt.ArrayLike,
    negative: npt.ArrayLike,
    edges: npt.ArrayLike,
    *,
    method: str = "youden",
    target_sensitivity: float | None = None,
) -> OperatingPoint:
    """Choose the decision threshold from pooled per-class histograms (module docstring).

    Parameters
    ----------
    positive, negative
        Pooled per-class counts on ``edges`` (validation patients).
    edges
        The bin edges (``len(positive) + 1`` values); thresholds are edges.
    method
        ``"youden"`` or ``"target-sensitivity"``.
    target_sensitivity
        For ``"target-sensitivity"``: the lowest acceptable sensitivity, in (0, 1].

    Returns
    -------
    OperatingPoint

    Raises
    ------
    ConfigError
        Unknown method, or a target outside (0, 1].
    DataError
        A class is absent from the histograms (no sensitivity or specificity to trade).
    """
    if method not in OPERATING_METHODS:
        raise ConfigError(f"operating-point method must be one of {OPERATING_METHODS}, "
                          f"got {method!r}")
    e = check_edges(edges)
    pos = counts_array(positive, "positive histogram")
    neg = counts_array(negative, "negative histogram")
    if pos.size != e.size - 1 or neg.size != e.size - 1:
        raise DataError("histograms do not match the edges", safe_reason="invalid statistics input")
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos == 0 or n_neg == 0:
        raise DataError("an operating point needs positive and negative validation patients",
                        safe_reason="no positive or no negative validation patients")
    tp, fp = cut_counts(pos, neg)
    sens = tp / n_pos
    spec = 1.0 - fp / n_neg
    if method == "youden":
        j = sens + spec - 1.0
        # The highest cut among the maxima (sklearn's thresholds decrease: argmax takes the
        # highest threshold of equal J).
        best = int(np.flatnonzero(j == j.max())[-1])
        target = None
    else:
        if target_sensitivity is None or not (0.0 < float(target_sensitivity) <= 1.0):
            raise ConfigError("target sensitivity must lie in (0, 1], got "
                              f"{target_sensitivity!r}")
        target = float(target_sensitivity)
        # sens is non-increasing in the cut; the highest cut that still reaches the target.
        reach = np.flatnonzero(sens >= target - 1e-12)
        best = int(reach[-1])
    cut = _middle_of_gap(pos, neg, best)
    t_pos, t_neg = int(tp[cut]), int(fp[cut])
    se, sp = t_pos / n_pos, 1.0 - t_neg / n_neg
    return OperatingPoint(
        method=method, threshold=float(e[cut]), cut=cut, sensitivity=float(se),
        specificity=float(sp), youden_j=float(se + sp - 1.0), tp=t_pos, fp=t_neg,
        tn=n_neg - t_neg, fn=n_pos - t_pos, target_sensitivity=target,
    )

