"""The final model and its operating point, all chosen on validation; test metrics at it.

After the last round the coordinator

1. **selects the final model** (:func:`select_final_round`): the round whose global model had
   the best pooled validation AUC (``auc-pooled``, from the per-class score histograms of the
   round's evaluation; the example-weighted mean of the sites' AUCs where some node keeps its
   histograms; the lowest pooled validation loss where no AUC is defined), loaded from that
   round's checkpoint (:func:`load_checkpoint`);
2. **recalibrates** its scores on the validation patients
   (:func:`server.inference.score_calibration`: Platt scaling by default, federated
   Newton-Raphson on summed gradients and information);
3. **chooses the decision threshold** on the calibrated validation probabilities
   (:func:`common.stats.operating_point.choose_operating_point`: Youden's J, or the operator's
   target sensitivity) from the pooled fine score histograms, or, where some node does not
   release them, from the pooled counts of 100 equal-width calibration bins;
4. **tests once** (:func:`server.inference.pooled_metrics` on the test split, calibrated, at
   that threshold): sensitivity, specificity, accuracy, precision and F1 with their intervals,
   the AUC with its DeLong interval, and ECE, Brier score and the reliability diagram after
   calibration, beside those of the uncalibrated scores (one more ``metrics`` round).

Nothing about the test patients feeds any choice. Every number comes from sums the nodes
release through their release rules (:mod:`client.release`, on their ledgers).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import TrainPlan
from common.errors import VesaliusError
from server.inference import (
    _METRICS_REQUIRED,
    _calibration,
    _calibration_sums_from_histograms,
    _flags,
    _histograms,
    _metrics_config,
    _metrics_round,
    pooled_metrics,
    score_calibration,
)
from server.strategies.fedavg import RoundLog

__all__ = ["SELECTION_AUC", "SELECTION_LOSS", "calibrated_inference", "load_checkpoint",
           "select_final_round"]

SELECTION_AUC = "best validation AUC"
SELECTION_LOSS = "lowest validation loss"
VALIDATION_BINS = 100
"""Equal-width calibration bins of the validation round (the coarse operating-point source)."""


def _finite(value: Any) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def select_final_round(rounds: Sequence[RoundLog]) -> dict[str, Any] | None:
    """The round whose global model did best on the validation patients.

    Candidates are the rounds in which some node trained and some node evaluated. The
    criterion is the pooled validation AUC (``auc-pooled``) when every candidate has one,
    otherwise the example-weighted mean of the sites' validation AUCs (``auc``); ties go to
    the later round. Without any AUC, the lowest pooled validation loss (``loss``, the
    example-weighted mean of the sites' mean losses, which is the pooled mean).

    Returns
    -------
    dict or None
        ``final_round``, ``selection`` (:data:`SELECTION_AUC` or :data:`SELECTION_LOSS`),
        ``metric`` (the round metric's key), ``value``, ``last_round`` and ``candidates``
        (``{"round", "value"}`` per candidate); ``None`` without any candidate.
    """
    rows = [r for r in rounds if r.train and r.evaluate_metrics]
    if not rows:
        return None
    for key, selection, sign in ((k.AUC_POOLED, SELECTION_AUC, 1.0),
                                 (k.AUC, SELECTION_AUC, 1.0),
                                 (k.LOSS, SELECTION_LOSS, -1.0)):
        values = [_finite(r.evaluate_metrics.get(key)) for r in rows]
        usable = [(r.round, v) for r, v in zip(rows, values, strict=True) if v is not None]
        if not usable or (key == k.AUC_POOLED and len(usable) < len(rows)):
            continue
        best_round, best = max(usable, key=lambda rv: (sign * rv[1], rv[0]))
        return {"final_round": best_round, "selection": selection, "metric": key,
                "value": best, "last_round": max(r.round for r in rows),
                "candidates": [{"round": r, "value": v} for r, v in usable]}
    return None


def load_checkpoint(checkpoint_dir: Path, server_round: int) -> ArrayRecord | None:
    """The global model after ``server_round`` (``round-<r>.pt``), or None if not written."""
    path = Path(checkpoint_dir) / f"round-{server_round}.pt"
    if not path.is_file():
        return None
    return ArrayRecord(torch.load(path, weights_only=True))


def _validation_point(
    res: Any, *, method: str, target: float | None
) -> tuple[Any, str]:
    """Operating point from a validation ``metrics`` round: fine histograms, else cal. bins."""
    from common.stats.bins import fine_score_edges, uniform_edges
    from common.stats.operating_point import choose_operating_point

    hists = _histograms(res)
    if hists and len(hists) == len(res.values):
        pos = np.sum([h[0] for h in hists.values()], axis=0)
        neg = np.sum([h[1] for h in hists.values()], axis=0)
        edges, source = fine_score_edges(), "fine score histograms"
    else:
        pooled = res.pooled((k.CAL_COUNT, k.CAL_LABEL_SUM))
        counts = np.maximum(np.rint(pooled[k.CAL_COUNT]), 0.0)
        pos = np.clip(np.rint(pooled[k.CAL_LABEL_SUM]), 0.0, counts)
        neg = counts - pos
        edges = uniform_edges(VALIDATION_BINS)
        source = f"{VALIDATION_BINS} calibration bins (some node keeps its score histograms)"
    pos = np.maximum(np.rint(pos), 0)
    neg = np.maximum(np.rint(neg), 0)
    return choose_operating_point(pos, neg, edges, method=method,
                                  target_sensitivity=target), source


def _curve(cal: Mapping[str, Any]) -> dict[str, Any]:
    """A calibration result of :func:`server.inference._calibration`, flattened."""
    out = dict(cal.get("bins") or {})
    out.update({key: v for key, v in cal.items() if key != "bins"})
    return out


def _uncalibrated_curve(raw: Any, bins: int) -> dict[str, Any]:
    """Reliability diagram, ECE and Brier score of a ``metrics`` round on the model's scores.

    From the calibration-bin sums, or, where small cells were suppressed and every node
    released its fine histograms, counted from those (as :func:`pooled_metrics` does).
    """
    noised, suppressed = _flags(raw)
    pooled = raw.pooled(_METRICS_REQUIRED)
    counts = np.maximum(np.rint(pooled[k.CAL_COUNT]), 0.0)
    sq = float(np.clip(pooled[k.BRIER_SUM], 0.0, max(float(pooled[k.NUM_EXAMPLES]), 0.0)))
    sums = {"count": counts, "score_sum": np.clip(pooled[k.CAL_SCORE_SUM], 0.0, counts),
            "label_sum": np.clip(pooled[k.CAL_LABEL_SUM], 0.0, counts), "sq_error_sum": sq}
    hists = _histograms(raw)
    note = ""
    if suppressed and not noised and hists and len(hists) == len(raw.values):
        pos = np.sum([h[0] for h in hists.values()], axis=0)
        neg = np.sum([h[1] for h in hists.values()], axis=0)
        sums = _calibration_sums_from_histograms(pos, neg, bins, sq)
        note = ("small calibration cells were suppressed at some node: counted from the "
                "released score histograms (scores at their fine bins' centres)")
    elif suppressed:
        note = f"{suppressed} small cell(s) were suppressed (released as 0)"
    out = _curve(_calibration(sums, bins))
    out["sites"] = [raw.sites[i] for i in raw.values]
    if note:
        out["note"] = note
    return out


def calibrated_inference(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    timeout: float,
    target_sensitivity: float = 0.0,
    calibration: str = "platt",
    alpha: float = 0.05,
    calibration_bins: int = 10,
    test_split: str = k.SPLIT_TEST,
) -> dict[str, Any]:
    """Steps 2-4 of the module docstring for the final model ``arrays``.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The final model's weights.
    plan
        Run plan (model, image size; the nodes' splits).
    timeout
        Seconds per query round.
    target_sensitivity
        0: Youden's J; in (0, 1]: the highest threshold whose validation sensitivity reaches
        it.
    calibration
        ``"platt"``, ``"temperature"`` or ``"none"``.
    alpha
        1 - confidence level of every interval.
    calibration_bins
        Equal-width bins of the test reliability diagrams.
    test_split
        Where the metrics are reported: ``"test"``, or ``"heldout"`` for a cross-validation
        fold (whose plan gives each node's validation part of the training folds).

    Returns
    -------
    dict
        The report's ``inference`` section (:func:`server.inference.pooled_metrics`'s, on the
        calibrated test probabilities at the chosen threshold) with ``operating_point``
        (method, ``threshold`` on the model's own scores, ``calibrated_threshold``, the
        calibration map, the validation sensitivity, specificity and J, ``chosen_on``) and
        ``calibration`` holding ``before`` and ``after`` reliability diagrams with ECE and
        Brier (the flat keys are the "after" ones), ``map`` and ``fit``.
    """
    from common.stats.calibration import ScoreCalibration

    method = "target-sensitivity" if target_sensitivity > 0 else "youden"
    target = float(target_sensitivity) if target_sensitivity > 0 else None
    failures: list[dict[str, Any]] = []
    heads: dict[int, str] = {}

    # 2. Recalibration on the validation patients.
    fit = score_calibration(grid, node_ids, arrays, plan, method=calibration,
                            split=k.SPLIT_VAL, timeout=timeout)
    failures.extend(fit.get("failures", []))
    cal_map = ScoreCalibration(**{key: fit["calibration"][key]
                                  for key in ("method", "intercept", "slope")})
    coef = cal_map.coefficients if cal_map.method != "none" else None
    ids = [int(n) for n in node_ids]
    if fit["status"] == "completed":
        ids = [i for i in ids if i not in {int(f["node_id"]) for f in fit["failures"]}]

    # 3. Threshold on the calibrated validation probabilities.
    val_cfg = _metrics_config(plan, split=k.SPLIT_VAL, threshold=0.5,
                              calibration_bins=VALIDATION_BINS, calibration=coef)
    val = _metrics_round(grid, ids, val_cfg, arrays, timeout=timeout)
    failures.extend(val.failures)
    heads.update(val.heads)
    op_note = ""
    point = None
    source = ""
    if val.values:
        try:
            point, source = _validation_point(val, method=method, target=target)
        except VesaliusError as exc:
            op_note = f"operating point not chosen on validation: {exc}"
    else:
        op_note = "no node answered the validation metrics query"
    threshold = point.threshold if point is not None else 0.5
    operating = {
        "method": method if point is not None else "default 0.5 (see note)",
        "target_sensitivity": target,
        "calibrated_threshold": threshold,
        "threshold": cal_map.score_for(threshold),
        "calibration": cal_map.method,
        "temperature": cal_map.temperature,
        "intercept": cal_map.intercept,
        "slope": cal_map.slope,
        "chosen_on": "validation",
        "source": source,
        "validation": ({"sensitivity": point.sensitivity, "specificity": point.specificity,
                        "youden_j": point.youden_j, "tp": point.tp, "fp": point.fp,
                        "tn": point.tn, "fn": point.fn,
                        "sites": [val.sites[i] for i in val.values]}
                       if point is not None else None),
        "note": op_note,
    }

    # 4. Test: metrics at the operating point on the calibrated probabilities ...
    section = pooled_metrics(grid, node_ids, arrays, plan, split=test_split,
                             timeout=timeout, alpha=alpha, threshold=threshold,
                             calibration_bins=calibration_bins, calibration=coef)
    heads.update(section.get("ledger_heads", {}))
    # ... and the uncalibrated scores' calibration (no histograms needed).
    raw_cfg = _metrics_config(plan, split=test_split, threshold=0.5,
                              calibration_bins=calibration_bins)
    raw = _metrics_round(grid, node_ids, raw_cfg, arrays, timeout=timeout)
    heads.update(raw.heads)
    failures.extend(raw.failures)
    before = _uncalibrated_curve(raw, calibration_bins) if raw.values else {}
    section["failures"] = [*failures, *section.get("failures", [])]
    section["ledger_heads"] = heads
    section["operating_point"] = operating
    after = dict(section.get("calibration") or {})
    section["calibration"] = {
        **after,
        "before": before,
        "after": after,
        "map": cal_map.as_dict(),
        "fitted_on": "validation",
        "fit": {key: fit.get(key) for key in ("status", "reason", "method", "sites",
                                              "query_rounds", "noised", "fit")},
    }
    return section
