"""Coordinator side of pooled multi-class inference: the final model at the arg-max class.

Two query rounds over the nodes' held-out patients (:mod:`client.queries.multiclass`):

1. ``multiclass-metrics``: every node releases its ``K x K`` confusion matrix (rows = true
   class, columns = arg-max class), its patient count, its log-likelihood sum and, where the
   hospital consents, its one-vs-rest score histograms. The pooled confusion matrix gives the
   accuracy (Wilson interval), the balanced accuracy (stratified Wald interval) and each
   class's sensitivity (recall) and precision (Wilson intervals)
   (:func:`common.stats.multiclass.confusion_metrics`).
2. ``multiclass-placements`` (to the nodes whose histograms were pooled): one-vs-rest DeLong
   placement sums against the pooled histograms, from which each class's AUC with its DeLong
   interval and the macro AUC with its label-covariance interval follow
   (:func:`common.stats.multiclass.ovr_auc`).

The predicted class is the arg-max of the class probabilities: no operating point is chosen
and no recalibration is fitted (the binary path, :mod:`server.final_model`, does both). Every
estimate equals the same computation on the pooled patients (scikit-learn's
``confusion_matrix``, ``accuracy_score``, ``balanced_accuracy_score``, ``recall_score``,
``precision_score``; ``roc_auc_score(multi_class="ovr")`` on the binned scores), unless a node
suppressed small confusion cells (the section then says so) or noised its release.

The result is the report's ``inference`` section for a multi-class run; its schema is in
:func:`multiclass_inference`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import TrainPlan
from common.errors import VesaliusError
from common.stats.multiclass import ConfusionMatrix, confusion_metrics, ovr_auc
from server.inference import QueryRound, query_nodes, secure_note
from server.inference_labels import (
    OVR_KEYS,
    counts,
    histogram_aucs,
    node_histograms,
    placement_sums,
    pooled_histograms,
    pooled_record,
    release_flags,
    roc,
)
from server.inference_secure import HIDDEN, is_secure

__all__ = ["multiclass_inference"]

log = logging.getLogger(__name__)

_METRICS_REQUIRED = (k.NUM_EXAMPLES, k.CONFUSION, k.LOGLIK)


def _site_rows(first: QueryRound, K: int) -> list[dict[str, Any]]:
    """Per site: patients, accuracy at the arg-max (its released confusion matrix) and the
    macro one-vs-rest AUC of its histograms (``None`` where a class is absent there)."""
    hists = node_histograms(first, K, OVR_KEYS)
    rows = []
    for nid, values in first.values.items():
        cm = counts(values[k.CONFUSION], (K, K))
        total = int(cm.sum())
        row: dict[str, Any] = {"site": first.sites[nid],
                               "n": int(round(float(values[k.NUM_EXAMPLES]))),
                               "class_counts": [int(v) for v in cm.sum(axis=1)],
                               "accuracy": float(np.trace(cm)) / total if total else None,
                               "macro_auc": None}
        if nid in hists:
            aucs = hists[nid].aucs()
            row["macro_auc"] = float(np.mean(aucs)) if np.all(np.isfinite(aucs)) else None
        rows.append(row)
    return rows


def _auc_part(grid: Grid, arrays: ArrayRecord, base: dict[str, Any], first: QueryRound,
              out: dict[str, Any], *, K: int, alpha: float, timeout: float) -> None:
    """Round 2 and the AUCs (into ``out["multiclass"]["auc"]`` and ``out["auc_note"]``)."""
    node_hists = node_histograms(first, K, OVR_KEYS)
    mc = out["multiclass"]
    if not node_hists:
        out["auc_note"] = "no node released score histograms (release-histograms is off)"
        if (first.secure or {}).get("partial"):
            out["auc_note"] = ("not every hospital released score histograms, and which did "
                               "is hidden by secure aggregation: no pooled AUC")
        return
    hists = pooled_histograms(node_hists)
    if len(node_hists) < len(first.values):
        out["auc_note"] = (f"AUC pools the {len(node_hists)} of {len(first.values)} sites that "
                           "release score histograms")
    mc["roc"] = roc(hists)
    if np.any(hists.positive.sum(axis=1) == 0) or np.any(hists.negative.sum(axis=1) == 0):
        out["auc_note"] = "AUC undefined: some class is absent from the pooled patients"
        return
    second = query_nodes(grid, first.nodes(list(node_hists)), "multiclass-placements", base,
                         timeout=timeout,
                         records={k.ARRAYS: arrays, k.POOLED: pooled_record(hists, OVR_KEYS)},
                         required=OVR_KEYS.placements)
    out["failures"].extend(second.failures)
    out["ledger_heads"].update(second.heads)
    if second.failures or not second.values:
        mc["auc"] = histogram_aucs(hists, "per_class")
        out["auc_note"] = ("DeLong CIs unavailable: not every node whose histograms were pooled "
                           "returned its placement sums")
        return
    noised, _ = release_flags(second)
    try:
        res = ovr_auc(hists, placement_sums(second, K, OVR_KEYS), alpha=alpha,
                      consistency_tol=None if noised else 1e-9)
    except VesaliusError as exc:
        mc["auc"] = histogram_aucs(hists, "per_class")
        out["auc_note"] = f"DeLong CIs unavailable: {exc}"
        return
    d = res.as_dict()
    mc["auc"] = {"macro": d["macro"], "per_class": d["per_label"], "p_values": d["p_values"],
                 "p_holm": d["p_holm"]}


def multiclass_inference(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str = k.SPLIT_TEST,
    timeout: float,
    alpha: float = 0.05,
    ci_method: str = "wilson",
) -> dict[str, Any]:
    """Pooled multi-class inference on one model over the nodes' held-out patients.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights (``num-classes`` outputs).
    plan
        Run plan (task ``multiclass``, ``num-classes``, model, image size, CV fields).
    split
        ``"val"``, ``"test"`` or ``"heldout"``.
    timeout
        Seconds per query round.
    alpha
        1 - confidence level of every interval.
    ci_method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for the proportions.

    Returns
    -------
    dict
        ``task`` ("multiclass"), ``status``, ``reason``, ``split``, ``alpha``, ``decision``
        ("argmax": no threshold), ``classes`` (K), ``n``, ``sites``, ``failures``,
        ``ledger_heads``, ``noised``, ``suppressed_cells``, ``metrics_note``, ``auc_note`` and
        ``multiclass``: ``confusion`` (K x K, rows = true class), ``class_counts`` (patients
        per true class), ``accuracy``, ``balanced_accuracy`` (estimate dicts: ``value``,
        ``lower``, ``upper``, ``se``, ``n``, ``method``), ``sensitivity`` and ``precision``
        (one estimate per class), ``loglik``, ``mean_loglik`` and ``auc`` (``macro``,
        ``per_class`` estimates with DeLong intervals, ``p_values``/``p_holm`` of AUC = 0.5;
        ``None`` when no histograms were released or a class is absent) and ``per_site``
        (``site``, ``n``, ``class_counts``, ``accuracy`` from the site's released confusion
        matrix, ``macro_auc`` of its histograms or ``None``) and ``roc`` (per class, the
        pooled one-vs-rest histograms without their empty bins, for the ROC plots).
    """
    K = plan.num_classes
    base: dict[str, Any] = {**plan.to_record(), k.SPLIT: split, k.WITH_HISTOGRAMS: True}
    first = query_nodes(grid, node_ids, "multiclass-metrics", base, timeout=timeout,
                        records={k.ARRAYS: arrays}, required=_METRICS_REQUIRED)
    out: dict[str, Any] = {"task": "multiclass", "split": split, "alpha": alpha,
                           "decision": "argmax", "classes": K,
                           "failures": list(first.failures), "ledger_heads": dict(first.heads)}
    if not first.values:
        out.update(status="failed", reason="no node answered the multiclass-metrics query")
        return out
    noised, suppressed = release_flags(first)
    pooled = first.pooled(_METRICS_REQUIRED)
    cm = ConfusionMatrix(counts=counts(pooled[k.CONFUSION], (K, K)))
    n = int(round(float(pooled[k.NUM_EXAMPLES])))
    metrics_note = ""
    if suppressed and not noised:
        metrics_note = (f"{suppressed} small confusion cell(s) were suppressed (released as 0): "
                        "the confusion-matrix metrics are computed on suppressed counts and "
                        "differ from the pooled-data values")
    try:
        cmetrics = confusion_metrics(cm, alpha=alpha, method=ci_method).as_dict()
    except VesaliusError as exc:
        reason = f"confusion metrics: {exc}"
        if suppressed and not noised and int(cm.counts.sum()) == 0:
            reason = (f"every confusion cell held fewer test patients than the hospitals' "
                      f"minimum release count and was suppressed ({n} test patients over {K} "
                      "classes): give each hospital more test patients per class, or lower the "
                      "nodes' --min-release-count (a simulation's --min-release-count)")
        out.update(status="failed", reason=reason, n=n, suppressed_cells=suppressed)
        return out
    loglik = float(pooled[k.LOGLIK])
    out.update(status="completed", reason="", n=n, sites=first.site_names(),
               noised=noised, suppressed_cells=suppressed, metrics_note=metrics_note,
               auc_note="")
    out["multiclass"] = {**cmetrics, "class_counts": [int(v) for v in cm.counts.sum(axis=1)],
                         "loglik": loglik, "mean_loglik": loglik / max(n, 1), "auc": None,
                         "per_site": HIDDEN if is_secure(first) else _site_rows(first, K)}
    if first.secure is not None:
        out["secure_aggregation"] = secure_note(first)
    _auc_part(grid, arrays, base, first, out, K=K, alpha=alpha, timeout=timeout)
    return out
