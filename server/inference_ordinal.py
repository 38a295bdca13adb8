"""Coordinator side of pooled ordinal inference: agreement of predicted with true grades.

One query round over the nodes' held-out patients (:mod:`client.queries.ordinal`): every node
releases its ``K x K`` confusion matrix of true grade (rows) against predicted grade (columns;
a patient's predicted grade is the number of thresholds ``k`` with mean ``P(grade > k) >= 0.5``)
and its patient count. The pooled matrix gives

* the weighted kappa (Cohen, Psychol. Bull. 1968; 70:213-220), quadratic (the headline) and
  linear, with the large-sample interval of Fleiss, Cohen & Everitt (Psychol. Bull. 1969;
  72:323-327) (:func:`common.stats.ordinal.weighted_kappa`);
* the mean absolute grade error with a t interval
  (:func:`common.stats.ordinal.mean_absolute_grade_error`);
* the accuracy (exact grade; Wilson interval), balanced accuracy and per-grade sensitivity and
  precision (Wilson intervals) (:func:`common.stats.multiclass.confusion_metrics`);
* per site, the quadratic-weighted kappa and accuracy of the site's own released matrix.

Every estimate is a function of the pooled matrix, so it equals the same computation on the
pooled patients (``sklearn.metrics.cohen_kappa_score(weights="quadratic")``,
``confusion_matrix``, ...), unless a node suppressed small confusion cells (the section then
says so in ``metrics_note``) or noised its release (``noised``). A node's refusal never raises:
it is listed in ``failures``, and a round nobody answered gives ``status`` ``"failed"`` with a
``reason``.
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
from common.stats.multiclass import ConfusionMatrix, confusion_metrics
from common.stats.ordinal import mean_absolute_grade_error, weighted_kappa
from server.inference import QueryRound, query_nodes, secure_note
from server.inference_secure import HIDDEN, is_secure
from server.inference_labels import counts, release_flags

__all__ = ["ordinal_inference"]

log = logging.getLogger(__name__)

QUERY = "ordinal-metrics"
_REQUIRED = (k.NUM_EXAMPLES, k.CONFUSION)


def _site_kappa(cm: np.ndarray) -> tuple[float | None, float | None]:
    """The site's quadratic kappa and its Fleiss-Cohen-Everitt standard error (or None)."""
    if cm.sum() == 0:
        return None, None
    try:
        est = weighted_kappa(ConfusionMatrix(counts=cm), weights="quadratic")
    except VesaliusError:
        return None, None
    value = float(est.value) if math.isfinite(est.value) else None
    se = float(est.se) if est.se is not None and math.isfinite(est.se) else None
    return value, se


def _site_rows(first: QueryRound, K: int) -> list[dict[str, Any]]:
    """Per site: patients, grade counts, quadratic kappa and accuracy of its released matrix."""
    rows = []
    for nid, values in first.values.items():
        cm = counts(values[k.CONFUSION], (K, K))
        total = int(cm.sum())
        kappa, kappa_se = _site_kappa(cm)
        rows.append({"site": first.sites[nid],
                     "n": int(round(float(values[k.NUM_EXAMPLES]))),
                     "class_counts": [int(v) for v in cm.sum(axis=1)],
                     "kappa_quadratic": kappa,
                     "kappa_quadratic_se": kappa_se,
                     "accuracy": float(np.trace(cm)) / total if total else None})
    return rows


def _suppressed_reason(n: int, K: int) -> str:
    return (f"every confusion cell held fewer test patients than the hospitals' minimum "
            f"release count and was suppressed ({n} test patients over {K} grades): give each "
            "hospital more test patients per grade, or lower the nodes' --min-release-count "
            "(a simulation's --min-release-count)")


def ordinal_inference(
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
    """Pooled ordinal inference on one model over the nodes' held-out patients.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights (``num-classes - 1`` cumulative logits).
    plan
        Run plan (task ``ordinal``, ``num-classes`` = K grades, model, image size, CV fields).
    split
        ``"val"``, ``"test"`` or ``"heldout"``.
    timeout
        Seconds for the query round.
    alpha
        1 - confidence level of every interval.
    ci_method
        ``"wilson"`` or ``"beta"`` (Clopper-Pearson) for the proportions.

    Returns
    -------
    dict
        ``task`` ("ordinal"), ``status`` ("completed" or "failed"), ``reason``, ``split``,
        ``alpha``, ``decision`` ("thresholds-0.5": the predicted grade is the number of
        thresholds with mean P(grade > k) >= 0.5), ``classes`` (K), ``n``, ``sites``,
        ``failures``, ``ledger_heads``, ``noised``, ``suppressed_cells``, ``metrics_note`` and
        ``ordinal``: ``kappa_quadratic`` and ``kappa_linear`` (estimate dicts: ``value``,
        ``lower``, ``upper``, ``se``, ``n``, ``method`` "fleiss-cohen-everitt"; numbers
        ``None`` where undefined), ``mae`` (mean absolute grade error, method "t"), ``confusion``
        (K x K, rows = true grade), ``class_counts`` (patients per true grade), ``accuracy``,
        ``balanced_accuracy``, ``sensitivity`` and ``precision`` (one estimate per grade) and
        ``per_site`` (``site``, ``n``, ``class_counts``, ``kappa_quadratic`` with its
        ``kappa_quadratic_se``, ``accuracy``
        from the site's released matrix, ``None`` where undefined).
    """
    K = plan.num_classes
    base: dict[str, Any] = {**plan.to_record(), k.SPLIT: split}
    first = query_nodes(grid, node_ids, QUERY, base, timeout=timeout,
                        records={k.ARRAYS: arrays}, required=_REQUIRED)
    out: dict[str, Any] = {"task": "ordinal", "split": split, "alpha": alpha,
                           "decision": "thresholds-0.5", "classes": K,
                           "failures": list(first.failures), "ledger_heads": dict(first.heads)}
    if not first.values:
        out.update(status="failed", reason=f"no node answered the {QUERY} query")
        return out
    noised, suppressed = release_flags(first)
    pooled = first.pooled(_REQUIRED)
    n = int(round(float(pooled[k.NUM_EXAMPLES])))
    cm = ConfusionMatrix(counts=counts(pooled[k.CONFUSION], (K, K)))
    out.update(n=n, noised=noised, suppressed_cells=suppressed)
    if cm.n == 0:
        out.update(status="failed", reason=_suppressed_reason(n, K) if suppressed and not noised
                   else "the pooled confusion matrix holds no patient")
        return out
    try:
        cmetrics = confusion_metrics(cm, alpha=alpha, method=ci_method).as_dict()
        quad = weighted_kappa(cm, weights="quadratic", alpha=alpha)
        lin = weighted_kappa(cm, weights="linear", alpha=alpha)
        mae = mean_absolute_grade_error(cm, alpha=alpha)
    except VesaliusError as exc:
        log.warning("ordinal inference: %s", exc)
        out.update(status="failed", reason=f"ordinal metrics: {exc.safe_reason}")
        return out
    metrics_note = ""
    if suppressed and not noised:
        metrics_note = (f"{suppressed} small confusion cell(s) were suppressed (released as 0): "
                        "kappa, grade error and the confusion metrics are computed on "
                        "suppressed counts and differ from the pooled-data values")
    if not math.isfinite(quad.value):
        metrics_note = ((metrics_note + "; ") if metrics_note else "") + (
            "weighted kappa undefined: every patient has the same true and the same "
            "predicted grade")
    out.update(status="completed", reason="", sites=first.site_names(),
               metrics_note=metrics_note)
    if first.secure is not None:
        out["secure_aggregation"] = secure_note(first)
    out["ordinal"] = {"kappa_quadratic": quad.as_dict(), "kappa_linear": lin.as_dict(),
                      "mae": mae.as_dict(), **cmetrics,
                      "class_counts": [int(v) for v in cm.counts.sum(axis=1)],
                      "per_site": HIDDEN if is_secure(first) else _site_rows(first, K)}
    return out
