"""Several binary AUCs on the same patients: per-label DeLong CIs, Holm tests, macro AUC.

A multi-label task (e.g. findings on a chest film) scores every patient once per label, and
every label has its own positives and negatives. Multi-class one-vs-rest AUC is the special
case of one-hot labels (:mod:`common.stats.multiclass` uses this module).

Two-pass protocol (nodes release sums only; as :mod:`common.stats.auc`)
-----------------------------------------------------------------------
1. :func:`label_histograms` (node): per label, the positive and negative score histograms on
   the fixed fine edges (:func:`common.stats.bins.fine_score_edges`). :class:`LabelHistograms`
   add up over nodes; the per-label AUC follows from the sum.
2. The coordinator sends the pooled histograms back; :func:`label_placement_sums` (node)
   releases, per label, the DeLong placement sums of
   :func:`common.stats.auc.node_placement_sums`, and one ``L x L`` matrix of cross-products
   of the patients' scaled, centred placement values (below). :class:`LabelPlacementSums`
   add up over nodes.

Coordinator: :func:`label_aucs` gives each label's AUC with its DeLong (1988) variance (the
binary machinery of :func:`common.stats.auc.delong_from_sums`, equal to DeLong on the pooled
binned scores), the two-sided p-value of H0: AUC = 0.5 (``z = (AUC - 0.5) / se``) with Holm's
step-down adjustment over the labels (Holm, Scand. J. Statist. 1979; 6:65-70; computed by
:func:`statsmodels.stats.multitest.multipletests`), and the macro AUC (unweighted mean over
labels, as ``sklearn.metrics.roc_auc_score(average="macro")``) with a Wald interval.

Covariance of AUCs with different positives (macro CI)
------------------------------------------------------
Each label's AUC is a two-sample U-statistic (Mann-Whitney), whose DeLong variance is built
from the structural components (placement values) of Sen (Calcutta Statist. Assoc. Bull.
1960; 10:1-18) and DeLong, DeLong & Clarke-Pearson (Biometrics 1988; 44:837-845). To first
order (Hoeffding's projection, Ann. Math. Statist. 1948; 19:293-325) ``AUC_l - E AUC_l`` is
a sum over patients of ``(V10_l(i) - AUC_l) / n_l`` for positives of label ``l`` and
``(V01_l(i) - AUC_l) / m_l`` for its negatives, so the covariance of two labels' AUCs is the
sum over patients of the product of their two terms, whichever class a patient has for each
label. We estimate it by::

    u_l(i) = (V_l(i) - AUC_l) / sqrt(n_l (n_l - 1))   if patient i is positive for label l
           = (V_l(i) - AUC_l) / sqrt(m_l (m_l - 1))   otherwise
    Cov(AUC_a, AUC_b) = sum_i u_a(i) u_b(i)

(``V`` is V10 for a positive and V01 for a negative). Its diagonal equals DeLong's variance
exactly (the tests check this), and with identical labels for all models it is DeLong's
paired covariance to first order. ``Var(macro) = 1' Cov 1 / L^2``. Without pass-2 cross
products, ``method="bound"`` uses ``(mean_l se_l)^2``, an upper bound by Cauchy-Schwarz
(``|Cov_ab| <= se_a se_b``). Either interval is Wald, clipped to [0, 1].

Privacy: a label whose pooled positives come from one patient at a node reveals that
patient's placement (and, in the cross matrix, products with the other labels'); the node's
release rules (minimum counts, small cells suppressed) apply to every label's counts.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.stats import norm
from statsmodels.stats.multitest import multipletests

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level
from common.stats._records import (
    Record,
    as_array,
    float_list,
    get_array,
    get_count,
    int_list,
    same,
)
from common.stats.auc import _placements, auc_ci, delong_from_sums, node_placement_sums
from common.stats.bins import check_edges, fine_score_edges, score_bin_index
from common.stats.estimate import Estimate
from common.stats.histogram import auc_from_histograms

__all__ = [
    "LabelHistograms",
    "LabelPlacementSums",
    "MultiAUC",
    "label_aucs",
    "label_histograms",
    "label_placement_sums",
]

MACRO_METHODS = ("covariance", "bound")
_SAFE = "invalid statistics input"


def score_matrix(scores: npt.ArrayLike, name: str = "scores") -> np.ndarray:
    """``(patients, labels)`` finite float scores with at least one of each."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 2 and s.shape[0] == 0:
        raise DataError(f"{name} is empty: no held-out patients at this site",
                        safe_reason="no held-out patients at this site")
    if s.ndim != 2 or s.shape[1] == 0:
        raise DataError(f"{name} must have shape (patients, labels), got {s.shape}",
                        safe_reason=_SAFE)
    if not np.all(np.isfinite(s)):
        raise DataError(f"{name} contains NaN or infinite values", safe_reason=_SAFE)
    return s


def _label_matrix(labels: npt.ArrayLike, shape: tuple[int, ...]) -> np.ndarray:
    y = np.asarray(labels)
    if y.shape != shape:
        raise DataError(f"labels have shape {y.shape}, the scores {shape}", safe_reason=_SAFE)
    if y.dtype != bool:
        if not np.all(np.isin(y, (0, 1))):
            raise DataError("multi-label labels must be binary (0/1)", safe_reason=_SAFE)
        y = y.astype(bool)
    return y


@dataclass(frozen=True, eq=False)
class LabelHistograms:
    """Pass 1: per-label score histograms on fixed edges (node-side; adds over nodes).

    Attributes
    ----------
    positive, negative : numpy.ndarray
        ``(labels, bins)`` int64 counts of the scores of label ``l``'s positive (negative)
        patients in each bin.

    Notes
    -----
    Reveals, per label, how many patients are positive and how their scores are spread; a
    bin count of 1 places one patient's score within a bin. Fine histograms leave a node only
    with its ``--release-histograms`` consent and under its small-cell rules.
    """

    positive: np.ndarray
    negative: np.ndarray

    KEYS: ClassVar[tuple[str, ...]] = ("labels", "bins", "hist_pos", "hist_neg")

    def __post_init__(self) -> None:
        pos = np.asarray(self.positive)
        if pos.ndim != 2:
            raise DataError("label histograms must have shape (labels, bins)", safe_reason=_SAFE)
        object.__setattr__(self, "positive", as_array(pos, pos.shape, counts=True,
                                                      name="hist_pos"))
        object.__setattr__(self, "negative", as_array(self.negative, pos.shape, counts=True,
                                                      name="hist_neg"))

    @property
    def n_labels(self) -> int:
        """Number of labels (classes for one-vs-rest)."""
        return int(self.positive.shape[0])

    @property
    def n_bins(self) -> int:
        """Number of bins."""
        return int(self.positive.shape[1])

    def merge(self, other: LabelHistograms) -> LabelHistograms:
        """Histograms of the union of both sets of patients."""
        same("label/bin layout", self.positive.shape, other.positive.shape)
        return LabelHistograms(positive=self.positive + other.positive,
                               negative=self.negative + other.negative)

    __add__ = merge

    def to_record(self) -> Record:
        """Flat ``{labels, bins, hist_pos, hist_neg}`` (histograms row-major by label)."""
        return {"labels": self.n_labels, "bins": self.n_bins,
                "hist_pos": int_list(self.positive), "hist_neg": int_list(self.negative)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LabelHistograms:
        """Inverse of :meth:`to_record`."""
        shape = (get_count(record, "labels"), get_count(record, "bins"))
        return cls(positive=get_array(record, "hist_pos", shape, counts=True),
                   negative=get_array(record, "hist_neg", shape, counts=True))

    def aucs(self) -> np.ndarray:
        """Per-label AUC of the binned scores (NaN where a class is empty)."""
        return np.array([auc_from_histograms(p, n)
                         for p, n in zip(self.positive, self.negative, strict=True)])


@dataclass(frozen=True, eq=False)
class LabelPlacementSums:
    """Pass 2: per-label DeLong placement sums and the label x label cross-products.

    Attributes
    ----------
    n_pos, n_neg : numpy.ndarray
        ``(labels,)`` int64: this node's positives and negatives per label.
    v10_sum, v10_sq, v01_sum, v01_sq : numpy.ndarray
        ``(labels,)``: sums of V10 and V10^2 over each label's positives, V01 and V01^2 over
        its negatives (:func:`common.stats.auc.node_placement_sums`, one label at a time).
    cross : numpy.ndarray
        ``(labels, labels)``: ``sum_i u_a(i) u_b(i)`` (module docstring).

    Notes
    -----
    Reveals sums of placement values (ranks against the pooled scores); with one positive
    patient for a label at a node, that patient's placement is revealed: the node's release
    rules (minimum counts) apply.
    """

    n_pos: np.ndarray
    n_neg: np.ndarray
    v10_sum: np.ndarray
    v10_sq: np.ndarray
    v01_sum: np.ndarray
    v01_sq: np.ndarray
    cross: np.ndarray

    _VECTORS: ClassVar[tuple[str, ...]] = ("v10_sum", "v10_sq", "v01_sum", "v01_sq")

    def __post_init__(self) -> None:
        n_pos = np.asarray(self.n_pos)
        if n_pos.ndim != 1 or n_pos.size == 0:
            raise DataError("placement sums need one count per label", safe_reason=_SAFE)
        k = n_pos.size
        object.__setattr__(self, "n_pos", as_array(n_pos, (k,), counts=True, name="n_pos"))
        object.__setattr__(self, "n_neg", as_array(self.n_neg, (k,), counts=True,
                                                   name="n_neg"))
        for name in self._VECTORS:
            object.__setattr__(self, name, as_array(getattr(self, name), (k,), counts=False,
                                                    name=name))
        object.__setattr__(self, "cross", as_array(self.cross, (k, k), counts=False,
                                                   name="cross"))

    @property
    def n_labels(self) -> int:
        """Number of labels."""
        return int(self.n_pos.size)

    def merge(self, other: LabelPlacementSums) -> LabelPlacementSums:
        """Sums over the union of both sets of patients."""
        same("number of labels", self.n_labels, other.n_labels)
        return LabelPlacementSums(
            n_pos=self.n_pos + other.n_pos, n_neg=self.n_neg + other.n_neg,
            v10_sum=self.v10_sum + other.v10_sum, v10_sq=self.v10_sq + other.v10_sq,
            v01_sum=self.v01_sum + other.v01_sum, v01_sq=self.v01_sq + other.v01_sq,
            cross=self.cross + other.cross)

    __add__ = merge

    def to_record(self) -> Record:
        """Flat record: ``labels``, ``n_pos``, ``n_neg`` (ints), sums and ``cross`` (floats)."""
        out: Record = {"labels": self.n_labels, "n_pos": int_list(self.n_pos),
                       "n_neg": int_list(self.n_neg)}
        for name in self._VECTORS:
            out[name] = float_list(getattr(self, name))
        out["cross"] = float_list(self.cross)
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> LabelPlacementSums:
        """Inverse of :meth:`to_record`."""
        k = get_count(record, "labels")
        vec = {name: get_array(record, name, (k,), counts=False) for name in cls._VECTORS}
        return cls(n_pos=get_array(record, "n_pos", (k,), counts=True),
                   n_neg=get_array(record, "n_neg", (k,), counts=True),
                   cross=get_array(record, "cross", (k, k), counts=False), **vec)

    def delong_sums(self, label: int) -> dict[str, Any]:
        """Label ``label``'s sums in the layout of :func:`common.stats.auc.node_placement_sums`."""
        return {"n_pos": int(self.n_pos[label]), "n_neg": int(self.n_neg[label]),
                "v10_sum": [float(self.v10_sum[label])],
                "v10_cross": [[float(self.v10_sq[label])]],
                "v01_sum": [float(self.v01_sum[label])],
                "v01_cross": [[float(self.v01_sq[label])]]}


def label_histograms(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> LabelHistograms:
    """Node-side pass 1: per-label positive/negative score histograms.

    Parameters
    ----------
    scores
        ``(patients, labels)`` probabilities in the range the edges cover ([0, 1] for the
        default edges; others are refused, see :func:`common.stats.bins.score_bin_index`).
    labels
        ``(patients, labels)`` binary ground truth.
    edges
        Bin edges shared by every node; default :func:`common.stats.bins.fine_score_edges`.
    """
    e = fine_score_edges() if edges is None else check_edges(edges)
    s = score_matrix(scores)
    y = _label_matrix(labels, s.shape)
    nb = e.size - 1
    pos = np.zeros((s.shape[1], nb), dtype=np.int64)
    neg = np.zeros_like(pos)
    for lab in range(s.shape[1]):
        idx = score_bin_index(s[:, lab], e)
        pos[lab] = np.bincount(idx[y[:, lab]], minlength=nb)
        neg[lab] = np.bincount(idx[~y[:, lab]], minlength=nb)
    return LabelHistograms(positive=pos, negative=neg)


def _scaled_placements(
    s: np.ndarray, y: np.ndarray, pos: np.ndarray, neg: np.ndarray, e: np.ndarray
) -> np.ndarray:
    """``u(i)`` of the module docstring for one label, for this node's patients."""
    n_pos, n_neg = int(pos.sum()), int(neg.sum())
    if n_pos < 2 or n_neg < 2:
        raise DataError("a DeLong variance needs at least two positives and two negatives "
                        "per label in the pooled histograms",
                        safe_reason="too few patients for a DeLong variance")
    v10_bin, v01_bin = _placements(pos.astype(np.float64), neg.astype(np.float64))
    auc = float(np.dot(pos, v10_bin) / n_pos)
    idx = score_bin_index(s, e)
    centred = np.where(y, v10_bin[idx], v01_bin[idx]) - auc
    scale = np.where(y, 1.0 / math.sqrt(n_pos * (n_pos - 1)),
                     1.0 / math.sqrt(n_neg * (n_neg - 1)))
    return centred * scale


def label_placement_sums(
    scores: npt.ArrayLike,
    labels: npt.ArrayLike,
    pooled: LabelHistograms,
    *,
    edges: npt.ArrayLike | None = None,
) -> LabelPlacementSums:
    """Node-side pass 2: placement sums against the pooled histograms (module docstring).

    Parameters
    ----------
    scores, labels
        As for :func:`label_histograms` (the same patients).
    pooled
        The pooled pass-1 histograms (sum over all nodes), sent back by the coordinator.
    edges
        The edges of pass 1.

    Raises
    ------
    DataError
        A label with fewer than two pooled positives or negatives, or histograms that do
        not match the scores' labels or the edges.
    """
    e = fine_score_edges() if edges is None else check_edges(edges)
    s = score_matrix(scores)
    y = _label_matrix(labels, s.shape)
    if pooled.n_labels != s.shape[1] or pooled.n_bins != e.size - 1:
        raise DataError(f"pooled histograms have {pooled.n_labels} labels x {pooled.n_bins} "
                        f"bins; the scores {s.shape[1]} labels and the edges {e.size - 1} bins",
                        safe_reason=_SAFE)
    k = s.shape[1]
    u = np.empty((s.shape[0], k))
    rows: dict[str, list[float]] = {n: [] for n in ("v10_sum", "v10_sq", "v01_sum", "v01_sq")}
    for lab in range(k):
        hist = (pooled.positive[lab], pooled.negative[lab])
        u[:, lab] = _scaled_placements(s[:, lab], y[:, lab], *hist, e)
        one = node_placement_sums([s[:, lab]], y[:, lab], [hist], edges=e)
        rows["v10_sum"].append(float(one["v10_sum"][0]))
        rows["v10_sq"].append(float(one["v10_cross"][0, 0]))
        rows["v01_sum"].append(float(one["v01_sum"][0]))
        rows["v01_sq"].append(float(one["v01_cross"][0, 0]))
    return LabelPlacementSums(n_pos=y.sum(axis=0), n_neg=(~y).sum(axis=0), cross=u.T @ u,
                              **{n: np.array(v) for n, v in rows.items()})


@dataclass(frozen=True)
class MultiAUC:
    """Per-label AUCs with DeLong CIs, tests of AUC = 0.5 and the macro AUC.

    Attributes
    ----------
    per_label : tuple of Estimate
        Each label's AUC with its DeLong Wald interval (method ``"delong"``).
    p_values, p_holm : tuple of float
        Two-sided p-values of H0: AUC = 0.5 (normal, DeLong SE), raw and Holm-adjusted over
        the labels. NaN where the SE is 0 (e.g. perfect separation: the DeLong variance is
        degenerate); such labels are left out of the Holm family.
    macro : Estimate
        Unweighted mean of the per-label AUCs; method ``"delong-covariance"`` or
        ``"delong-bound"``.
    covariance : tuple of tuple of float
        The label x label AUC covariance matrix (empty with ``method="bound"``).
    """

    per_label: tuple[Estimate, ...]
    p_values: tuple[float, ...]
    p_holm: tuple[float, ...]
    macro: Estimate
    covariance: tuple[tuple[float, ...], ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite numbers become ``None``)."""

        def num(v: float) -> float | None:
            return v if math.isfinite(v) else None

        return {"per_label": [e.as_dict() for e in self.per_label],
                "p_values": [num(p) for p in self.p_values],
                "p_holm": [num(p) for p in self.p_holm], "macro": self.macro.as_dict(),
                "covariance": [[num(v) for v in row] for row in self.covariance]}


def _holm(p: np.ndarray, alpha: float) -> np.ndarray:
    out = np.full_like(p, math.nan)
    ok = np.isfinite(p)
    if ok.any():
        out[ok] = multipletests(p[ok], alpha=alpha, method="holm")[1]
    return out


def label_aucs(
    hists: LabelHistograms,
    sums: LabelPlacementSums,
    *,
    alpha: float = 0.05,
    method: str = "covariance",
    consistency_tol: float | None = 1e-9,
) -> MultiAUC:
    """Coordinator: per-label and macro AUC with CIs from pooled pass-1 and pass-2 sums.

    Parameters
    ----------
    hists
        Pooled :class:`LabelHistograms` (pass 1).
    sums
        Pooled :class:`LabelPlacementSums` (pass 2, against ``hists``).
    alpha
        1 - confidence level, also the family-wise level passed to Holm.
    method
        Macro-AUC variance: ``"covariance"`` (the cross matrix) or ``"bound"``.
    consistency_tol
        As :func:`common.stats.auc.delong_from_sums`; also checks that the class counts of
        ``sums`` are those of ``hists``. ``None`` disables the checks (noised sums).

    Raises
    ------
    DataError
        A label with an empty class (its AUC is undefined, as in sklearn), too few patients
        for a DeLong variance, or sums inconsistent with the histograms.
    """
    a = alpha_level(alpha)
    if method not in MACRO_METHODS:
        raise ConfigError(f"macro AUC method must be one of {MACRO_METHODS}, got {method!r}")
    same("number of labels", hists.n_labels, sums.n_labels)
    if consistency_tol is not None and not (
            np.array_equal(hists.positive.sum(axis=1), sums.n_pos)
            and np.array_equal(hists.negative.sum(axis=1), sums.n_neg)):
        raise DataError("placement sums do not come from the patients of these histograms",
                        safe_reason="inconsistent placement sums")
    k = hists.n_labels
    n = int(hists.positive[0].sum() + hists.negative[0].sum())
    ests, p = [], np.full(k, math.nan)
    for lab in range(k):
        res = delong_from_sums(sums.delong_sums(lab), consistency_tol=consistency_tol)
        ests.append(auc_ci(res.auc, res.var, n=n, alpha=a))
        if res.var > 0:
            p[lab] = 2.0 * float(norm.sf(abs(res.auc - 0.5) / math.sqrt(res.var)))
    values = np.array([e.value for e in ests])
    if method == "covariance":
        cov = (sums.cross + sums.cross.T) / 2.0
        var = float(cov.sum()) / k**2
        cov_rows = tuple(tuple(float(v) for v in row) for row in cov)
    else:
        var = float(np.mean([e.se for e in ests])) ** 2
        cov_rows = ()
    macro = auc_ci(float(values.mean()), max(var, 0.0), n=n, alpha=a)
    return MultiAUC(per_label=tuple(ests), p_values=tuple(float(v) for v in p),
                    p_holm=tuple(float(v) for v in _holm(p, a)),
                    macro=replace(macro, method=f"delong-{method}"), covariance=cov_rows)
