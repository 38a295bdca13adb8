"""The coordinator's workflow of ``--paradigm multi-task``: two heads, each with its own result.

1. Rounds: :func:`server.app.run_federation` under the stage paradigm ``multi-task-rounds``
   (the nodes' two-head DP-SGD step, :mod:`client.paradigms.multi_task`); its final test
   evaluation and pooled inference are the segmentation task's (per-patient Dice and HD95 of
   the segmentation head, :mod:`server.inference_segmentation`).
2. Presence head: one query (``multi-task-presence``, :mod:`client.queries.multi_task`) on
   every hospital's validation patients, then its test patients, with the final model; the
   pooled patient-weighted validation histograms choose the operating threshold (Youden's J,
   :func:`youden_threshold`: a DP-trained head may put every image on one side of 0.5), and
   the test histograms give the presence AUC and, at that threshold, accuracy, sensitivity and
   specificity (:func:`presence_summary`), pooled and per hospital.
3. The report (with the run's own plan: ``paradigm: multi-task``) gets a paradigm section:
   the task weights, one row per task with its pooled test result, the per-hospital table.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.paradigms import get_paradigm, read_options
from common.paradigms.multi_task import MULTI_TASK_ROUNDS, PRESENCE_HIST, QUERY
from common.stats.histogram import auc_from_histograms
from common.stats.histogram import youden_threshold as youden
from server.progress import ProgressCallback
from server.report import RunReport

__all__ = ["multi_task_section", "presence_summary", "run_multi_task", "youden_threshold"]

log = logging.getLogger(__name__)

SCORE_BINS = 1000
"""Bins of the presence histograms asked of the nodes (even: 0.5 is a bin edge)."""


def youden_threshold(hist: np.ndarray) -> float:
    """Youden's operating threshold of weighted ``(2, B)`` histograms (row 0 lesion, row 1
    none): :func:`common.stats.histogram.youden_threshold`, weights kept (not rounded)."""
    return youden(*np.asarray(hist, dtype=np.float64))


def presence_summary(hist: np.ndarray, threshold: float = 0.5) -> dict[str, Any]:
    """Presence-head statistics of pooled ``(2, B)`` histograms (row 0 lesion, row 1 none).

    Returns the patient-weighted AUC (Mann-Whitney on the bins,
    :func:`common.stats.histogram.auc_from_histograms`) and, calling "lesion" where the
    probability is at least ``threshold`` (rounded to a bin edge ``j / B``), accuracy,
    sensitivity and specificity, with the weighted image counts of each class (each patient
    weighs 1 in total).
    """
    pos, neg = np.asarray(hist, dtype=np.float64)
    j = int(min(max(round(float(threshold) * pos.size), 0), pos.size))
    tp, fn = pos[j:].sum(), pos[:j].sum()
    tn, fp = neg[:j].sum(), neg[j:].sum()
    total = tp + fn + tn + fp

    def ratio(a: float, b: float) -> float | None:
        return float(a / b) if b > 0 else None

    auc = auc_from_histograms(pos, neg)
    return {"auc": None if np.isnan(auc) else float(auc), "accuracy": ratio(tp + tn, total),
            "sensitivity": ratio(tp, tp + fn), "specificity": ratio(tn, tn + fp),
            "lesion_weight": float(tp + fn), "no_lesion_weight": float(tn + fp)}


def _final_arrays(report: RunReport) -> ArrayRecord | None:
    path = Path(report.config.out_dir) / "checkpoints" / "final.pt"
    if report.status not in ("completed", "incomplete") or not path.exists():
        return None
    return ArrayRecord(torch.load(path, map_location="cpu", weights_only=True))


def _presence(grid: Grid, config: RunConfig, arrays: ArrayRecord,
              split: str = k.SPLIT_TEST, threshold: float = 0.5) -> dict[str, Any]:
    """Ask every node for its presence histograms on ``split``; pool them (figures at
    ``threshold``)."""
    from server.inference import query_nodes

    cfg = {**config.plan.to_record(), k.SPLIT: split, k.VALUE_BINS: SCORE_BINS}
    res = query_nodes(grid, list(grid.get_node_ids()), QUERY, cfg,
                      timeout=config.round_timeout, records={k.ARRAYS: arrays},
                      required=(PRESENCE_HIST,))
    out: dict[str, Any] = {"failures": res.failures, "heads": dict(res.heads), "sites": [],
                           "in_the_clear": bool(res.secure) and not res.secure.get("covered"),
                           "threshold": float(threshold)}
    if not res.values:
        return out
    pooled = res.pooled((PRESENCE_HIST, k.NUM_EXAMPLES))
    out["hist"] = np.reshape(pooled[PRESENCE_HIST], (2, SCORE_BINS))
    out["pooled"] = {**presence_summary(out["hist"], threshold),
                     "n": int(round(float(pooled[k.NUM_EXAMPLES])))}
    for node, values in res.values.items():
        site = presence_summary(np.reshape(values[PRESENCE_HIST], (2, SCORE_BINS)), threshold)
        out["sites"].append({"site": res.sites.get(node, f"node-{node}"),
                             "n": int(round(float(values[k.NUM_EXAMPLES]))), **site})
    return out


def _dice(doc: dict[str, Any]) -> tuple[float | None, int | None]:
    """The pooled inference's mean Dice over test patients, and the patient count."""
    seg = (doc.get("inference") or {}).get("segmentation") or {}
    dice = seg.get("dice")
    value = dice.get("mean", dice.get("value")) if isinstance(dice, dict) else dice
    n = seg.get("n")
    return (float(value) if isinstance(value, (int, float)) else None,
            int(n) if isinstance(n, (int, float)) else None)


def multi_task_section(report: RunReport, config: RunConfig,
                       presence: dict[str, Any]) -> dict[str, Any]:
    """The report's paradigm section (:mod:`server.report_paradigm`)."""
    plan = config.plan
    options = read_options(get_paradigm(plan.paradigm), plan.paradigm_options)
    doc = report.to_dict()
    dice, n_seg = _dice(doc)
    pooled = presence.get("pooled") or {}
    tasks = [
        ["segmentation (lesion mask)", options["segmentation-weight"],
         "mean Dice per test patient", dice, n_seg],
        ["presence (image holds a lesion)", options["presence-weight"],
         "AUC per image, each patient weighing 1", pooled.get("auc"), pooled.get("n")],
    ]
    sites = [[s["site"], s["n"], s["auc"], s["accuracy"], s["sensitivity"], s["specificity"]]
             for s in presence.get("sites", [])]
    notes = [
        "one shared U-Net trunk; the segmentation head predicts the lesion mask, the presence "
        "head (bottleneck features averaged, one linear layer) whether the image holds a "
        "lesion; the presence target is derived at each node from the image's own mask",
        "per-sample loss of one patient's record = segmentation-weight x (cross-entropy + soft "
        "Dice) + presence-weight x cross-entropy, so DP-SGD clips each patient's whole "
        "multi-task gradient",
        "presence results pool the hospitals' patient-weighted score histograms of the test "
        "patients' images (each patient weighs 1 however many images it has); 'lesion' where "
        f"the probability is at least {presence.get('threshold', 0.5):.3f}, the operating "
        "threshold chosen on the validation patients' pooled histograms (Youden's J; 0.5 when "
        "they lack a class): a DP-trained head may put every image on one side of 0.5",
    ]
    if presence.get("in_the_clear"):
        notes.append("the presence query is not covered by secure aggregation: each hospital "
                     "released its own presence histograms to the coordinator (on its ledger)")
    if presence.get("failures"):
        notes.append("presence query not answered by: " + "; ".join(
            f"{f['site']}: {f['reason']}" for f in presence["failures"]))
    tables: list[dict[str, Any]] = [
        {"title": "Per-task result on the test patients (pooled)",
         "columns": ["task", "loss weight", "metric", "value", "test patients"], "rows": tasks},
    ]
    if pooled:
        tables.append({"title": "Presence head at probability "
                                f"{presence.get('threshold', 0.5):.3f} (pooled test patients)",
                       "columns": ["accuracy", "sensitivity", "specificity"],
                       "rows": [[pooled.get("accuracy"), pooled.get("sensitivity"),
                                 pooled.get("specificity")]]})
    if sites:
        tables.append({"title": "Presence head per hospital (test patients)",
                       "columns": ["hospital", "patients", "AUC", "accuracy", "sensitivity",
                                   "specificity"], "rows": sites})
    return {"name": plan.paradigm, "summary": get_paradigm(plan.paradigm).summary,
            "options": {**options, "model": plan.model}, "notes": notes, "tables": tables,
            "presence": presence}


def run_multi_task(grid: Grid, config: RunConfig, *, on_round: Any = None,
                   on_progress: ProgressCallback | None = None) -> RunReport:
    """Run the multi-task federation on ``grid``; return and write its report."""
    from server.app import run_federation
    from server.report_html import write_report_html

    rounds = dataclasses.replace(config, plan=dataclasses.replace(
        config.plan, paradigm=MULTI_TASK_ROUNDS.name))
    report = run_federation(grid, rounds, on_round=on_round, on_progress=on_progress)
    ran = report.config  # with the run id (and folder) run_federation gave it
    report.config = dataclasses.replace(ran, plan=dataclasses.replace(
        ran.plan, paradigm=config.plan.paradigm))
    arrays = _final_arrays(report)
    presence: dict[str, Any] = {"failures": [], "sites": []}
    if arrays is not None:
        try:
            val = _presence(grid, ran, arrays, k.SPLIT_VAL)
            threshold = youden_threshold(val["hist"]) if "hist" in val else 0.5
            presence = _presence(grid, ran, arrays, k.SPLIT_TEST, threshold)
            presence.pop("hist", None)  # the report keeps the figures, not the histograms
        except Exception as exc:  # noqa: BLE001 - the rounds completed; the section says why
            log.warning("presence query failed: %s", exc)
            presence["failures"] = [{"site": "all", "reason": f"{type(exc).__name__}: {exc}"}]
    report.extra["paradigm"] = multi_task_section(report, report.config, presence)
    out_dir = Path(report.config.out_dir)
    report.write(out_dir)
    write_report_html(report.to_dict(), out_dir / "report.html")
    return report
