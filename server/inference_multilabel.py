"""Coordinator side of pooled multi-label inference: one AUC per finding, Holm-corrected.

Two query rounds over the nodes' held-out patients (:mod:`client.queries.multilabel`):

1. ``multilabel-metrics``: every node releases its patient count, per finding the 2 x 2 table
   at probability 0.5 and, where the hospital consents, the finding's score histograms of its
   positive and negative patients on the fixed fine edges. The pooled tables give each
   finding's sensitivity and specificity at 0.5 (Wilson intervals); the pooled histograms give
   each finding's prevalence and AUC.
2. ``multilabel-placements`` (to the nodes whose histograms were pooled): per finding, DeLong
   placement sums against the pooled histograms, and the cross-products of scaled placements.
   :func:`common.stats.multilabel.label_aucs` turns them into each finding's AUC with its
   DeLong interval (DeLong, DeLong & Clarke-Pearson, Biometrics 1988; 44:837-845), the
   two-sided p-value of AUC = 0.5 with Holm's step-down adjustment over the findings (Holm,
   Scand. J. Statist. 1979; 6:65-70), and the macro AUC (their mean) with the interval of the
   findings' DeLong covariance.

Every estimate equals the same computation on the pooled patients (``roc_auc_score`` per
finding on the binned scores, ``multipletests(method="holm")``), unless a node noised its
release (``noised``) or suppressed small cells of its 2 x 2 tables (``metrics_note``). A node's
refusal never raises: it is listed in ``failures``; without placement sums the AUCs come
without intervals (``auc_note`` says why).
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
from common.stats.metrics import proportion_ci
from common.stats.multilabel import label_aucs
from server.inference import QueryRound, query_nodes, secure_note
from server.inference_secure import HIDDEN, is_secure
from server.inference_labels import (
    LabelKeys,
    counts,
    histogram_aucs,
    node_histograms,
    placement_sums,
    pooled_histograms,
    pooled_record,
    release_flags,
    roc,
)

__all__ = ["multilabel_inference"]

log = logging.getLogger(__name__)

METRICS_QUERY = "multilabel-metrics"
PLACEMENTS_QUERY = "multilabel-placements"
_METRICS_REQUIRED = (k.NUM_EXAMPLES, k.LABEL_CONFUSION)
KEYS = LabelKeys(k.LABEL_HIST_POSITIVE, k.LABEL_HIST_NEGATIVE, k.LABEL_NUM_POSITIVE,
                 k.LABEL_NUM_NEGATIVE, k.LABEL_V10_SUM, k.LABEL_V10_SQ, k.LABEL_V01_SUM,
                 k.LABEL_V01_SQ, k.LABEL_CROSS)
"""The multi-label wire keys of the per-finding histograms and placement sums."""


def _finite(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _site_rows(first: QueryRound, K: int) -> list[dict[str, Any]]:
    """Per site: patients, positives per finding (its 2 x 2 tables) and the macro AUC of its
    histograms (``None`` where a finding lacks positives or negatives there)."""
    hists = node_histograms(first, K, KEYS)
    rows = []
    for nid, values in first.values.items():
        table = counts(values[k.LABEL_CONFUSION], (K, 4))
        row: dict[str, Any] = {"site": first.sites[nid],
                               "n": int(round(float(values[k.NUM_EXAMPLES]))),
                               "positives": [int(v) for v in table[:, 0] + table[:, 2]],
                               "macro_auc": None}
        if nid in hists:
            row["positives"] = [int(v) for v in hists[nid].positive.sum(axis=1)]
            aucs = hists[nid].aucs()
            row["macro_auc"] = float(np.mean(aucs)) if np.all(np.isfinite(aucs)) else None
        rows.append(row)
    return rows


def _threshold_metrics(table: np.ndarray, *, alpha: float, method: str) -> dict[str, Any]:
    """Per finding sensitivity ``tp / (tp + fn)`` and specificity ``tn / (tn + fp)`` at 0.5."""
    tp, fp, fn, tn = (table[:, j].astype(int) for j in range(4))
    return {"sensitivity": [proportion_ci(int(a), int(a + b), alpha=alpha, method=method)
                            .as_dict() for a, b in zip(tp, fn, strict=True)],
            "specificity": [proportion_ci(int(a), int(a + b), alpha=alpha, method=method)
                            .as_dict() for a, b in zip(tn, fp, strict=True)]}


def _auc_part(grid: Grid, arrays: ArrayRecord, base: dict[str, Any], first: QueryRound,
              out: dict[str, Any], *, K: int, alpha: float, timeout: float) -> None:
    """Round 2 and the AUCs (into ``out["multilabel"]`` and ``out["auc_note"]``)."""
    node_hists = node_histograms(first, K, KEYS)
    ml = out["multilabel"]
    if not node_hists:
        out["auc_note"] = "no node released score histograms (release-histograms is off)"
        return
    hists = pooled_histograms(node_hists)
    n_pos, n_all = hists.positive.sum(axis=1), hists.positive.sum(axis=1) \
        + hists.negative.sum(axis=1)
    if len(node_hists) == len(first.values):  # exact counts of every answering site
        ml["positives"] = [int(v) for v in n_pos]
        ml["prevalence"] = [float(p) / float(t) if t else None
                            for p, t in zip(n_pos, n_all, strict=True)]
    ml["roc"] = roc(hists)
    notes = []
    if len(node_hists) < len(first.values):
        notes.append(f"AUC pools the {len(node_hists)} of {len(first.values)} sites that "
                     "release score histograms")
    empty = [j for j in range(K) if n_pos[j] == 0 or n_pos[j] == n_all[j]]
    if empty:
        ml["auc"] = histogram_aucs(hists, "per_label")
        notes.append("AUC undefined for finding(s) " + ", ".join(map(str, empty))
                     + ": no pooled positive or no pooled negative patient")
        out["auc_note"] = "; ".join(notes)
        return
    second = query_nodes(grid, first.nodes(list(node_hists)), PLACEMENTS_QUERY, base,
                         timeout=timeout,
                         records={k.ARRAYS: arrays, k.POOLED: pooled_record(hists, KEYS)},
                         required=KEYS.placements)
    out["failures"].extend(second.failures)
    out["ledger_heads"].update(second.heads)
    if second.failures or not second.values:
        ml["auc"] = histogram_aucs(hists, "per_label")
        notes.append("DeLong CIs unavailable: not every node whose histograms were pooled "
                     "returned its placement sums")
        out["auc_note"] = "; ".join(notes)
        return
    noised, _ = release_flags(second)
    out["noised"] = bool(out["noised"] or noised)
    try:
        res = label_aucs(hists, placement_sums(second, K, KEYS), alpha=alpha,
                         consistency_tol=None if noised else 1e-9)
    except VesaliusError as exc:
        ml["auc"] = histogram_aucs(hists, "per_label")
        notes.append(f"DeLong CIs unavailable: {exc.safe_reason}")
        out["auc_note"] = "; ".join(notes)
        return
    d = res.as_dict()
    ml["auc"] = {"macro": d["macro"], "per_label": d["per_label"], "p_values": d["p_values"],
                 "p_holm": d["p_holm"]}
    out["auc_note"] = "; ".join(notes)


def multilabel_inference(
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
    """Pooled multi-label inference on one model over the nodes' held-out patients.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights (``num-classes`` finding logits).
    plan
        Run plan (task ``multilabel``, ``num-classes`` = K findings, model, image size, CV).
    split
        ``"val"``, ``"test"`` or ``"heldout"``.
    timeout
        Seconds per query round.
    alpha
        1 - confidence level of every interval, and Holm's family-wise level.
    ci_method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for sensitivity and specificity.

    Returns
    -------
    dict
        ``task`` ("multilabel"), ``status`` ("completed" or "failed"), ``reason``, ``split``,
        ``alpha``, ``decision`` ("threshold-0.5": a finding is called at probability >= 0.5),
        ``labels`` (K), ``n``, ``sites``, ``failures``, ``ledger_heads``, ``noised``,
        ``suppressed_cells``, ``metrics_note``, ``auc_note`` and ``multilabel``:
        ``positives`` (pooled positive patients per finding; from the histograms when every
        answering site released them, else from the 2 x 2 tables), ``prevalence`` (per finding, ``None`` without patients),
        ``sensitivity`` and ``specificity`` at 0.5 (one estimate dict per finding: ``value``,
        ``lower``, ``upper``, ``se``, ``n``, ``method``), ``auc`` (``macro`` and
        ``per_label`` estimates with DeLong intervals, ``p_values`` and Holm-adjusted
        ``p_holm`` of AUC = 0.5; estimates of method "histogram" without intervals when the
        placement round failed; ``None`` when no histograms were released), ``roc`` (per
        finding the pooled histograms without empty bins, ``{"pos", "neg"}``; absent
        without histograms) and ``per_site`` (``site``, ``n``, ``positives``, ``macro_auc``
        of its histograms or ``None``).
    """
    K = plan.num_classes
    base: dict[str, Any] = {**plan.to_record(), k.SPLIT: split, k.WITH_HISTOGRAMS: True}
    first = query_nodes(grid, node_ids, METRICS_QUERY, base, timeout=timeout,
                        records={k.ARRAYS: arrays}, required=_METRICS_REQUIRED)
    out: dict[str, Any] = {"task": "multilabel", "split": split, "alpha": alpha,
                           "decision": "threshold-0.5", "labels": K,
                           "failures": list(first.failures), "ledger_heads": dict(first.heads)}
    if not first.values:
        out.update(status="failed", reason=f"no node answered the {METRICS_QUERY} query")
        return out
    noised, suppressed = release_flags(first)
    pooled = first.pooled(_METRICS_REQUIRED)
    n = int(round(float(pooled[k.NUM_EXAMPLES])))
    table = counts(pooled[k.LABEL_CONFUSION], (K, 4))
    metrics_note = ""
    if suppressed and not noised:
        metrics_note = (f"{suppressed} small cell(s) of the per-finding 2 x 2 tables were "
                        "suppressed (released as 0): sensitivity and specificity at 0.5 are "
                        "computed on suppressed counts and differ from the pooled-data values")
    positives = table[:, 0] + table[:, 2]
    out.update(status="completed", reason="", n=n, sites=first.site_names(),
               noised=noised, suppressed_cells=suppressed, metrics_note=metrics_note,
               auc_note="")
    out["multilabel"] = {
        "positives": [int(v) for v in positives],
        "prevalence": [float(v) / n if n else None for v in positives],
        **_threshold_metrics(table, alpha=alpha, method=ci_method),
        "auc": None, "per_site": HIDDEN if is_secure(first) else _site_rows(first, K)}
    if first.secure is not None:
        out["secure_aggregation"] = secure_note(first)
    _auc_part(grid, arrays, base, first, out, K=K, alpha=alpha, timeout=timeout)
    return out
