"""AUC-ROC, its DeLong variance and the paired DeLong test from summed node statistics.

Two-pass protocol (nodes release sums only)
-------------------------------------------
1. Each node releases per-class score histograms on fixed edges
   (:func:`common.stats.bins.class_histograms`, one pair per model); the coordinator adds them.
   The AUC follows from the pooled histograms (:func:`common.stats.histogram.auc_from_histograms`).
2. The coordinator sends the pooled histograms back. Each node computes, for each of its own
   patients and each model, the DeLong placement value against the *pooled* histograms
   (:func:`node_placement_sums`) and releases only per-class sums, and sums of products
   (squares and, for two or more models scored on the same patients, cross-products).
   The coordinator adds these and calls :func:`delong_from_sums` or
   :func:`paired_delong_from_sums`.

The result equals DeLong's estimator (DeLong, DeLong & Clarke-Pearson, Biometrics 1988;
44:837-845) computed on the pooled *binned* scores (scores replaced by their bin; patients in
the same bin are ties and count 1/2), to rounding error. Placement values, for positive ``i``
and negative ``j`` with scores ``X_i`` and ``Y_j``::

    V10(X_i) = (#{Y < X_i} + 0.5 #{Y = X_i}) / n_neg
    V01(Y_j) = (#{X > Y_j} + 0.5 #{X = Y_j}) / n_pos
    AUC = mean V10 = mean V01
    S10 = sum (V10 - AUC)^2 / (n_pos - 1),  S01 likewise,   Var(AUC) = S10 / n_pos + S01 / n_neg
    Cov(AUC_a, AUC_b) = S10_ab / n_pos + S01_ab / n_neg  (S_ab from cross-products)

Privacy caveat: a node with a single positive (or negative) patient reveals that patient's
placement value through the sum; the node's release rules (minimum counts) must apply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.stats import norm

from common.errors import DataError
from common.stats._checks import alpha_level, as_labels, as_scores, count, require_keys
from common.stats.bins import check_edges, fine_score_edges, score_bin_index
from common.stats.estimate import Estimate

PLACEMENT_KEYS = ("n_pos", "n_neg", "v10_sum", "v10_cross", "v01_sum", "v01_cross")

Hists = tuple[npt.ArrayLike, npt.ArrayLike]


class DeLongResult(NamedTuple):
    """AUC and its DeLong variance."""

    auc: float
    var: float


class PairedDeLongResult(NamedTuple):
    """Paired DeLong test of ``AUC_a - AUC_b`` (two-sided)."""

    auc_a: float
    auc_b: float
    diff: float
    se: float
    z: float
    p: float


def _placements(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin placement values (V10 for a positive in the bin, V01 for a negative)."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        raise DataError("pooled histograms need at least one positive and one negative",
                        safe_reason="AUC undefined: one class is empty")
    neg_below = np.cumsum(neg) - neg
    pos_above = pos.sum() - np.cumsum(pos)
    v10 = (neg_below + 0.5 * neg) / n_neg
    v01 = (pos_above + 0.5 * pos) / n_pos
    return v10, v01


def _as_models(
    scores_by_model: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike],
    pooled_hists: Mapping[str, Hists] | Sequence[Hists],
) -> tuple[list[np.ndarray], list[tuple[np.ndarray, np.ndarray]]]:
    if isinstance(scores_by_model, Mapping):
        if not isinstance(pooled_hists, Mapping) or set(pooled_hists) != set(scores_by_model):
            raise DataError("pooled_hists must have the same model names as scores_by_model",
                            safe_reason="invalid statistics input")
        names = list(scores_by_model)
        scores = [scores_by_model[n] for n in names]
        hists = [pooled_hists[n] for n in names]
    else:
        if isinstance(pooled_hists, Mapping):
            raise DataError("pass scores_by_model and pooled_hists both as sequences or "
                            "both as mappings", safe_reason="invalid statistics input")
        scores, hists = list(scores_by_model), list(pooled_hists)
    if len(scores) == 0 or len(scores) != len(hists):
        raise DataError(f"{len(scores)} models' scores but {len(hists)} pooled histograms",
                        safe_reason="invalid statistics input")
    arrays = [as_scores(s) for s in scores]
    h = [(np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)) for p, q in hists]
    return arrays, h


def node_placement_sums(
    scores_by_model: Mapping[str, npt.ArrayLike] | Sequence[npt.ArrayLike],
    labels: npt.ArrayLike,
    pooled_hists: Mapping[str, Hists] | Sequence[Hists],
    *,
    edges: npt.ArrayLike | None = None,
) -> dict[str, Any]:
    """Node-side pass 2: sums of DeLong placement values against the pooled histograms.

    Parameters
    ----------
    scores_by_model
        One score array per model, all for the *same* patients in the same order (a mapping
        model name -> scores, or a sequence). Model ``k`` is the k-th entry. Scores must lie
        in the range the edges cover ([0, 1] for the default edges): see
        :func:`common.stats.bins.score_bin_index`.
    labels
        Binary labels of those patients.
    pooled_hists
        Pooled ``(positive, negative)`` histograms per model from pass 1 (same order/names).
    edges
        The bin edges the histograms were computed on (default :func:`fine_score_edges`).

    Returns
    -------
    dict
        ``n_pos``, ``n_neg`` (this node's class counts); ``v10_sum`` (shape ``(M,)``) and
        ``v10_cross`` (``(M, M)``, sums of ``V10_a V10_b`` over this node's positives);
        ``v01_sum`` and ``v01_cross`` likewise over its negatives. All additive over nodes.
    """
    e = fine_score_edges() if edges is None else check_edges(edges)
    arrays, hists = _as_models(scores_by_model, pooled_hists)
    n = arrays[0].size
    if any(a.size != n for a in arrays):
        raise DataError("every model must score the same patients",
                        safe_reason="invalid statistics input")
    y = as_labels(labels, n)
    v10_rows, v01_rows = [], []
    for s, (pos, neg) in zip(arrays, hists, strict=True):
        if pos.shape != (e.size - 1,) or neg.shape != (e.size - 1,):
            raise DataError(f"pooled histograms must have {e.size - 1} bins",
                            safe_reason="invalid statistics input")
        v10_bin, v01_bin = _placements(pos, neg)
        idx = score_bin_index(s, e)
        v10_rows.append(v10_bin[idx[y]])
        v01_rows.append(v01_bin[idx[~y]])
    v10 = np.vstack(v10_rows)  # (M, n_pos at this node)
    v01 = np.vstack(v01_rows)
    return {
        "n_pos": int(y.sum()),
        "n_neg": int((~y).sum()),
        "v10_sum": v10.sum(axis=1),
        "v10_cross": v10 @ v10.T,
        "v01_sum": v01.sum(axis=1),
        "v01_cross": v01 @ v01.T,
    }


def _covariance(
    sums: Mapping[str, Any], consistency_tol: float | None = 1e-9
) -> tuple[np.ndarray, np.ndarray]:
    """(AUCs, DeLong covariance matrix) from pooled placement sums.

    ``mean V10 == mean V01`` holds exactly when every node used the same pooled histograms;
    it is checked to ``consistency_tol`` (pass ``None`` for noised sums).
    """
    require_keys(sums, PLACEMENT_KEYS, "placement sums")
    m, n = count(sums["n_pos"], "n_pos"), count(sums["n_neg"], "n_neg")
    if m < 2 or n < 2:
        raise DataError("DeLong variance needs at least two positives and two negatives",
                        safe_reason="too few patients for a DeLong variance")
    v10s = np.atleast_1d(np.asarray(sums["v10_sum"], dtype=np.float64))
    v01s = np.atleast_1d(np.asarray(sums["v01_sum"], dtype=np.float64))
    k = v10s.size
    v10c = np.asarray(sums["v10_cross"], dtype=np.float64).reshape(k, k)
    v01c = np.asarray(sums["v01_cross"], dtype=np.float64).reshape(k, k)
    auc = v10s / m
    if consistency_tol is not None and not np.allclose(auc, v01s / n, rtol=0,
                                                         atol=consistency_tol):
        raise DataError("placement sums are inconsistent (mean V10 != mean V01): were all "
                        "nodes given the same pooled histograms?",
                        safe_reason="inconsistent placement sums")
    s10 = (v10c - m * np.outer(auc, auc)) / (m - 1)
    s01 = (v01c - n * np.outer(auc, auc)) / (n - 1)
    return auc, s10 / m + s01 / n


def delong_from_sums(
    sums: Mapping[str, Any], model: int = 0, *, consistency_tol: float | None = 1e-9
) -> DeLongResult:
    """Coordinator: AUC and DeLong variance of model ``model`` from summed placement sums.

    Parameters
    ----------
    sums
        :func:`node_placement_sums` outputs added over nodes (``common.stats.sum_stats``).
    model
        Index of the model (order of ``scores_by_model`` at the nodes).
    consistency_tol
        Tolerance of the check ``mean V10 == mean V01``; ``None`` disables it (noised sums).

    Raises
    ------
    DataError
        Missing keys, fewer than two patients in a class, or inconsistent sums.
    """
    auc, cov = _covariance(sums, consistency_tol)
    if not 0 <= model < auc.size:
        raise DataError(f"model index {model} out of range (0..{auc.size - 1})",
                        safe_reason="invalid statistics input")
    return DeLongResult(float(auc[model]), float(max(cov[model, model], 0.0)))


def paired_delong_from_sums(
    sums: Mapping[str, Any], a: int = 0, b: int = 1, *, consistency_tol: float | None = 1e-9
) -> PairedDeLongResult:
    """Coordinator: paired DeLong test of ``AUC_a - AUC_b`` on the same patients.

    ``z = (AUC_a - AUC_b) / sqrt(Var_a + Var_b - 2 Cov_ab)``, two-sided normal p-value.
    If the two models' placement values are identical, ``se`` is 0, ``z`` is NaN and
    ``p`` is 1. ``consistency_tol`` as in :func:`delong_from_sums`.
    """
    auc, cov = _covariance(sums, consistency_tol)
    if auc.size < 2 or not (0 <= a < auc.size and 0 <= b < auc.size) or a == b:
        raise DataError("paired DeLong needs two distinct model indices within the sums",
                        safe_reason="invalid statistics input")
    diff = float(auc[a] - auc[b])
    var = float(cov[a, a] + cov[b, b] - 2 * cov[a, b])
    se = math.sqrt(max(var, 0.0))
    if se <= 1e-15:
        return PairedDeLongResult(float(auc[a]), float(auc[b]), diff, 0.0, math.nan, 1.0)
    z = diff / se
    return PairedDeLongResult(float(auc[a]), float(auc[b]), diff, se, z,
                              float(2 * norm.sf(abs(z))))


def auc_ci(auc: float, var: float, *, n: int = 0, alpha: float = 0.05) -> Estimate:
    """Wald interval ``AUC +- z sqrt(var)``, clipped to [0, 1] (method ``"delong"``).

    Parameters
    ----------
    auc
        The AUC, in [0, 1], or NaN when it is undefined (e.g. a class without patients).
    var
        Its variance (e.g. :func:`delong_from_sums`), finite and >= 0, or NaN when undefined.
    n
        Patients the estimate rests on (reported only).
    alpha
        1 - confidence level.

    Returns
    -------
    Estimate
        ``value``, ``lower``, ``upper``, ``se``. An undefined AUC gives an undefined interval
        (all four NaN, ``None`` in :meth:`Estimate.as_dict`), never ``(0, 1)``; a NaN variance
        keeps the AUC and leaves the interval and ``se`` undefined.

    Raises
    ------
    DataError
        An AUC outside [0, 1] (or infinite), or an infinite or negative variance.
    """
    z = float(norm.ppf(1 - alpha_level(alpha) / 2))
    a, v = float(auc), float(var)
    if math.isnan(a):
        return Estimate(math.nan, math.nan, math.nan, math.nan, n, "delong")
    if not 0.0 <= a <= 1.0:
        raise DataError(f"an AUC must lie in [0, 1] (or be NaN when undefined), got {auc!r}",
                        safe_reason="invalid statistics input")
    if math.isnan(v):
        return Estimate(a, math.nan, math.nan, math.nan, n, "delong")
    if not math.isfinite(v) or v < 0:
        raise DataError(f"variance must be finite and >= 0 (or NaN when undefined), got "
                        f"{var!r}", safe_reason="invalid statistics input")
    se = math.sqrt(v)
    return Estimate(a, max(0.0, a - z * se), min(1.0, a + z * se), se, n, "delong")


def local_delong(
    scores: npt.ArrayLike, labels: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> DeLongResult:
    """One site's own AUC and DeLong variance (binned on ``edges``), e.g. for a meta-analysis.

    Computed at the node from its own data; only the two numbers need leave it. ``scores``
    are probabilities in [0, 1] (the default edges' range): NaN, infinite or out-of-range
    scores raise :class:`~common.errors.DataError` rather than being clipped into the end
    bins; map logits through the sigmoid (``scipy.special.expit``) first.
    """
    from common.stats.bins import class_histograms

    e = fine_score_edges() if edges is None else check_edges(edges)
    hist = class_histograms(scores, labels, e)
    return delong_from_sums(node_placement_sums([scores], labels, [hist], edges=e))
