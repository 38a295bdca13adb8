"""The coordinator's workflow of ``--paradigm mil``: supervised rounds of an MIL model.

A bag (a study's volume, read as its slices) is one record of the node's DP-SGD, and the MIL
model's attention pooling stays inside it, so the nodes train as in supervised runs. The
workflow runs :func:`server.app.run_federation` with the plan's paradigm set to
"supervised" (the same training, without this workflow again), then writes the report with
the run's own plan (``paradigm: mil``) and its paradigm section: what the bags were, how many
each hospital trained on, the pooled test result, and that slice attention exists only at
the nodes (``vesalius node attention``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from common.config import RunConfig
from common.paradigms import DEFAULT_PARADIGM, get_paradigm
from server.progress import ProgressCallback
from server.report import RunReport

__all__ = ["mil_section", "run_mil"]

ATTENTION_NOTE = ("slice attention is computed and shown only at each hospital "
                  "(`vesalius node attention --data-dir ... --checkpoint final.pt`); no node "
                  "sends it and the coordinator never sees it")


HIDDEN = "hidden (secure aggregation)"


def _pooled_test_auc(doc: dict[str, Any], task: str) -> tuple[float | None, str]:
    """The pooled inference's test AUC (binary; macro for multi-class) and its name."""
    inference = doc.get("inference") or {}
    if task == "multiclass":
        macro = ((inference.get("multiclass") or {}).get("auc") or {}).get("macro")
        value = macro.get("value") if isinstance(macro, dict) else macro
        return (float(value) if isinstance(value, (int, float)) else None), "pooled test macro AUC"
    auc = (inference.get("metrics") or {}).get("auc")
    value = auc.get("value") if isinstance(auc, dict) else auc
    if not isinstance(value, (int, float)):
        value = (doc.get("final") or {}).get("auc_pooled")
    return (float(value) if isinstance(value, (int, float)) else None), "pooled test AUC"


def mil_section(report: RunReport, config: RunConfig) -> dict[str, Any]:
    """The report's paradigm section of an MIL run (:mod:`server.report_paradigm`)."""
    plan = config.plan
    doc = report.to_dict()
    size = plan.image_size
    rows = [[row["site"], HIDDEN if row["num_examples"] is None else row["num_examples"], size,
             row["epsilon"]] for row in doc["sites"]]
    notes = [
        f"bags: one per study, its {plan.samples} sample (the study's longest series, "
        f"resampled to {size} slices of {size}x{size}); the bag's label is the study's label",
        "one bag = one patient = one DP-SGD record; attention pooling mixes slices within a "
        "bag only",
        ATTENTION_NOTE,
    ]
    result, metric = _pooled_test_auc(doc, plan.task)
    tables: list[dict[str, Any]] = [{
        "title": "Training bags per hospital",
        "columns": ["hospital", "bags (patients)", "slices per bag", "ε"],
        "rows": rows,
    }]
    if result is not None:
        tables.append({"title": "Bag-level result on the test patients",
                       "columns": ["model", metric],
                       "rows": [[plan.model, result]]})
    return {"name": plan.paradigm, "summary": get_paradigm(plan.paradigm).summary,
            "options": {"model": plan.model, "samples": plan.samples}, "notes": notes,
            "tables": tables}


def run_mil(grid: Grid, config: RunConfig, *, on_round: Any = None,
            on_progress: ProgressCallback | None = None) -> RunReport:
    """Run the MIL federation on ``grid``; return and write its report."""
    from server.app import run_federation
    from server.report_html import write_report_html

    supervised = dataclasses.replace(config, plan=dataclasses.replace(
        config.plan, paradigm=DEFAULT_PARADIGM, paradigm_options=""))
    report = run_federation(grid, supervised, on_round=on_round, on_progress=on_progress)
    ran = report.config  # with the run id (and folder) run_federation gave it
    report.config = dataclasses.replace(ran, plan=dataclasses.replace(
        ran.plan, paradigm=config.plan.paradigm, paradigm_options=config.plan.paradigm_options))
    report.extra["paradigm"] = mil_section(report, report.config)
    out_dir = Path(report.config.out_dir)
    report.write(out_dir)
    write_report_html(report.to_dict(), out_dir / "report.html")
    return report
