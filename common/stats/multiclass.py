"""Multi-class classification: pooled confusion matrix, accuracy, balanced accuracy, OvR AUC.

Node side
---------
* :func:`confusion_matrix_counts`: the ``K x K`` confusion matrix of the node's held-out
  patients (rows = true class, columns = predicted class, as
  ``sklearn.metrics.confusion_matrix``); :class:`ConfusionMatrix` adds over nodes.
* :func:`ovr_histograms` (pass 1) and :func:`ovr_placement_sums` (pass 2): one-vs-rest score
  histograms and DeLong placement sums per class, i.e. the multi-label machinery of
  :mod:`common.stats.multilabel` on one-hot labels (class ``k``'s positives are the patients
  of class ``k``, scored by their probability of class ``k``).

Coordinator side
----------------
* :func:`confusion_metrics`: the pooled confusion matrix, accuracy (Wilson interval),
  per-class sensitivity (recall, ``cm[k, k] / row k``) and precision (``cm[k, k] /
  column k``) with Wilson intervals (statsmodels ``proportion_confint``, through
  :func:`common.stats.metrics.proportion_ci`), and balanced accuracy (mean recall over the
  classes present, as ``sklearn.metrics.balanced_accuracy_score``; Brodersen et al., ICPR
  2010). Its interval is the normal (Wald) approximation for a mean of independent binomial
  proportions given the class sizes, ``Var = sum_k r_k (1 - r_k) / n_k / K^2``, clipped to
  [0, 1] (zero-width when every recall is 0 or 1: say so when you report it). Every
  estimate equals the same computation on the pooled patients exactly.
* :func:`ovr_auc`: per-class one-vs-rest AUC with DeLong intervals, and the macro AUC
  (``sklearn.metrics.roc_auc_score(multi_class="ovr", average="macro")`` on the binned
  scores) with the label-covariance interval of :mod:`common.stats.multilabel`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

from common.errors import DataError
from common.stats._checks import alpha_level
from common.stats._records import Record, as_array, get_array, get_count, int_list, same
from common.stats.estimate import Estimate
from common.stats.metrics import proportion_ci
from common.stats.multilabel import (
    LabelHistograms,
    LabelPlacementSums,
    MultiAUC,
    label_aucs,
    label_histograms,
    label_placement_sums,
    score_matrix,
)

__all__ = [
    "ConfusionMatrix",
    "MulticlassMetrics",
    "class_labels",
    "confusion_matrix_counts",
    "confusion_metrics",
    "ovr_auc",
    "ovr_histograms",
    "ovr_placement_sums",
]

_SAFE = "invalid statistics input"


def class_labels(labels: npt.ArrayLike, n_classes: int, name: str = "labels") -> np.ndarray:
    """Class indices ``0 .. n_classes - 1`` as a non-empty 1-D int64 array."""
    if int(n_classes) != n_classes or n_classes < 2:
        raise DataError(f"n_classes must be an integer >= 2, got {n_classes!r}",
                        safe_reason=_SAFE)
    y = np.asarray(labels, dtype=np.float64)
    if y.ndim != 1 or y.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array",
                        safe_reason="no held-out patients at this site" if y.size == 0
                        else _SAFE)
    if not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or np.any(y < 0) \
            or np.any(y >= n_classes):
        raise DataError(f"{name} must be class indices in 0..{int(n_classes) - 1}",
                        safe_reason=_SAFE)
    return y.astype(np.int64)


@dataclass(frozen=True, eq=False)
class ConfusionMatrix:
    """A ``K x K`` confusion matrix (rows = true class, columns = predicted class).

    Attributes
    ----------
    counts : numpy.ndarray
        int64 counts; adds over nodes.

    Notes
    -----
    Reveals the number of patients per (true, predicted) pair; a cell of 1 identifies one
    patient's class (and the model's call on it) to anyone who knows the patient was tested:
    the node's release rules suppress small cells.
    """

    counts: np.ndarray

    KEYS: ClassVar[tuple[str, ...]] = ("classes", "confusion")

    def __post_init__(self) -> None:
        cm = np.asarray(self.counts)
        if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.shape[0] < 2:
            raise DataError(f"a confusion matrix must be K x K with K >= 2, got {cm.shape}",
                            safe_reason=_SAFE)
        object.__setattr__(self, "counts", as_array(cm, cm.shape, counts=True,
                                                    name="confusion"))

    @property
    def n_classes(self) -> int:
        """K."""
        return int(self.counts.shape[0])

    @property
    def n(self) -> int:
        """Patients."""
        return int(self.counts.sum())

    def merge(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Confusion matrix of the union of both sets of patients."""
        same("number of classes", self.n_classes, other.n_classes)
        return ConfusionMatrix(counts=self.counts + other.counts)

    __add__ = merge

    def to_record(self) -> Record:
        """``{"classes": K, "confusion": [K*K ints, row-major]}``."""
        return {"classes": self.n_classes, "confusion": int_list(self.counts)}

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ConfusionMatrix:
        """Inverse of :meth:`to_record`."""
        k = get_count(record, "classes")
        return cls(counts=get_array(record, "confusion", (k, k), counts=True))


def confusion_matrix_counts(
    labels: npt.ArrayLike, predicted: npt.ArrayLike, *, n_classes: int
) -> ConfusionMatrix:
    """Node-side confusion matrix of true ``labels`` against ``predicted`` classes.

    ``predicted`` is usually the arg-max of the class probabilities (``probs.argmax(1)``).
    """
    y = class_labels(labels, n_classes)
    p = class_labels(predicted, n_classes, "predicted")
    if p.size != y.size:
        raise DataError("predicted and true classes differ in length", safe_reason=_SAFE)
    cm = np.bincount(y * n_classes + p, minlength=n_classes * n_classes)
    return ConfusionMatrix(counts=cm.reshape(n_classes, n_classes))


def _one_hot(probs: npt.ArrayLike, labels: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s = score_matrix(probs, "probabilities")
    if s.shape[1] < 2:
        raise DataError("one-vs-rest needs at least two classes", safe_reason=_SAFE)
    y = class_labels(labels, s.shape[1])
    if y.size != s.shape[0]:
        raise DataError("one class label per row of probabilities", safe_reason=_SAFE)
    return s, y[:, None] == np.arange(s.shape[1])[None, :]


def ovr_histograms(
    probs: npt.ArrayLike, labels: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> LabelHistograms:
    """Node-side pass 1: class ``k``'s score histograms for class-``k`` and other patients.

    Parameters
    ----------
    probs
        ``(patients, K)`` class probabilities in [0, 1] (the default edges' range).
    labels
        True class indices ``0 .. K - 1``.
    edges
        Shared fine edges (default :func:`common.stats.bins.fine_score_edges`).
    """
    s, onehot = _one_hot(probs, labels)
    return label_histograms(s, onehot, edges=edges)


def ovr_placement_sums(
    probs: npt.ArrayLike,
    labels: npt.ArrayLike,
    pooled: LabelHistograms,
    *,
    edges: npt.ArrayLike | None = None,
) -> LabelPlacementSums:
    """Node-side pass 2: one-vs-rest DeLong sums against the pooled pass-1 histograms."""
    s, onehot = _one_hot(probs, labels)
    return label_placement_sums(s, onehot, pooled, edges=edges)


def ovr_auc(
    hists: LabelHistograms,
    sums: LabelPlacementSums,
    *,
    alpha: float = 0.05,
    method: str = "covariance",
    consistency_tol: float | None = 1e-9,
) -> MultiAUC:
    """Coordinator: per-class one-vs-rest AUCs with DeLong CIs and the macro AUC.

    See :func:`common.stats.multilabel.label_aucs` (the same computation on one-hot labels);
    ``per_label[k]`` is class ``k``'s AUC, ``macro`` their mean.
    """
    return label_aucs(hists, sums, alpha=alpha, method=method,
                      consistency_tol=consistency_tol)


@dataclass(frozen=True)
class MulticlassMetrics:
    """Pooled multi-class threshold metrics.

    Attributes
    ----------
    confusion : tuple of tuple of int
        The pooled confusion matrix (rows = true class).
    accuracy, balanced_accuracy : Estimate
        Wilson (accuracy) and Wald (balanced accuracy, ``"wald-stratified"``) intervals.
    sensitivity, precision : tuple of Estimate
        Per class, Wilson intervals (NaN where the class has no patients / no predictions).
    """

    confusion: tuple[tuple[int, ...], ...]
    accuracy: Estimate
    balanced_accuracy: Estimate
    sensitivity: tuple[Estimate, ...]
    precision: tuple[Estimate, ...]

    @property
    def recall(self) -> tuple[Estimate, ...]:
        """Alias of :attr:`sensitivity`."""
        return self.sensitivity

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"confusion": [list(r) for r in self.confusion],
                "accuracy": self.accuracy.as_dict(),
                "balanced_accuracy": self.balanced_accuracy.as_dict(),
                "sensitivity": [e.as_dict() for e in self.sensitivity],
                "precision": [e.as_dict() for e in self.precision]}


def _balanced_accuracy(cm: np.ndarray, z: float) -> Estimate:
    n_k = cm.sum(axis=1)
    present = n_k > 0
    if not present.any():
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, "wald-stratified")
    r = np.diag(cm)[present] / n_k[present]
    k = int(present.sum())
    value = float(r.mean())
    se = math.sqrt(float(np.sum(r * (1 - r) / n_k[present]))) / k
    return Estimate(value, max(0.0, value - z * se), min(1.0, value + z * se), se,
                    int(n_k.sum()), "wald-stratified")


def confusion_metrics(
    cm: ConfusionMatrix, *, alpha: float = 0.05, method: str = "wilson"
) -> MulticlassMetrics:
    """Coordinator: accuracy, balanced accuracy, per-class sensitivity and precision.

    Parameters
    ----------
    cm
        The pooled :class:`ConfusionMatrix` (sum over nodes).
    alpha
        1 - confidence level.
    method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for the proportions.

    Returns
    -------
    MulticlassMetrics
    """
    z = float(norm.ppf(1 - alpha_level(alpha) / 2))
    c = cm.counts
    if c.sum() == 0:
        raise DataError("the pooled confusion matrix is empty", safe_reason="no data")
    diag = np.diag(c)
    rows, cols = c.sum(axis=1), c.sum(axis=0)
    return MulticlassMetrics(
        confusion=tuple(tuple(int(v) for v in row) for row in c),
        accuracy=proportion_ci(int(diag.sum()), int(c.sum()), alpha=alpha, method=method),
        balanced_accuracy=_balanced_accuracy(c, z),
        sensitivity=tuple(proportion_ci(int(d), int(n), alpha=alpha, method=method)
                          for d, n in zip(diag, rows, strict=True)),
        precision=tuple(proportion_ci(int(d), int(n), alpha=alpha, method=method)
                        for d, n in zip(diag, cols, strict=True)),
    )
