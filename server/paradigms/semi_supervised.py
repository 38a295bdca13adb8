"""The coordinator's side of ``--paradigm semi-supervised`` (:mod:`common.paradigms.semi_supervised`).

The rounds are ordinary FedAvg rounds (:func:`server.app.run_federation`) whose plan names the
stage paradigm ``semi-supervised-rounds``, so that every node trains with
:func:`client.paradigms.semi_supervised.semi_supervised_training`; the report keeps the run's
own configuration and gains the paradigm section (``report.extra["paradigm"]``).

What the section may say: the options, and the training patients the nodes released as their
example counts (labelled + unlabelled together; their total only, and nothing when secure
aggregation hides the counts). How many of a hospital's patients are labelled, and how many
pseudo-labels it accepted, are not released by the nodes (a count leaving a node would need
its release rules), so the report does not show them.

In ``vesalius federation cv`` each fold is :func:`server.cv.run_fold` (plain rounds of the
plan, whose node step is the paradigm's hook) plus the paradigm's notes
(:func:`run_semi_supervised_fold`): a node trains on the fold's training patients (labels
hidden for all but ``labelled-fraction`` of them) and its unlabelled patients, and evaluates on
the fold's held-out labelled patients only; an unlabelled patient has no label, so it is never
in a held-out part.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from common.config import RunConfig
from common.paradigms import get_paradigm, read_options
from common.paradigms.semi_supervised import SEMI_SUPERVISED, SEMI_SUPERVISED_ROUNDS

__all__ = ["paradigm_section", "run_semi_supervised", "run_semi_supervised_fold"]


def _notes(options: dict[str, Any], augment: str) -> list[str]:
    method = options["method"]
    notes = [
        "every hospital trains on its labelled and its unlabelled training patients: one "
        "DP-SGD record per patient, labelled or not; each hospital's accountant and ledger "
        "count all of them",
    ]
    if options["labelled-fraction"] < 1.0:
        notes.append(f"benchmark setting: each hospital hid the labels of all but "
                     f"{options['labelled-fraction']:.0%} of its training patients (stratified, "
                     "chosen at the hospital; the coordinator does not know which)")
    if method in ("pseudo-label", "both"):
        notes.append(f"pseudo-labels: the global model's class where its probability is at "
                     f"least {options['threshold']:g}, recomputed at each hospital at the "
                     "start of every local step")
    if method in ("consistency", "both"):
        notes.append(f"consistency: KL divergence between the predictions on a strongly and "
                     f"a lightly augmented view of the same record (MONAI transforms), "
                     f"weight {options['consistency-weight']:g}")
    else:
        notes.append(f"augmentation of the trained view: {augment}")
    notes.append("not released: how many patients each hospital has labelled and how many "
                 "pseudo-labels it accepted (they stay in each hospital's log)")
    return notes


def paradigm_section(report_doc: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The report's paradigm section for a finished run (``report_doc``: its ``to_dict``)."""
    options = read_options(SEMI_SUPERVISED, config.plan.paradigm_options)
    counts = [site.get("num_examples") for site in report_doc.get("sites", [])]
    tables = []
    if counts and all(isinstance(c, int) for c in counts):
        tables.append({
            "title": "Training patients (labelled + unlabelled), as the hospitals released "
                     "their example counts",
            "columns": ["hospitals", "patients in all"],
            "rows": [[len(counts), sum(counts)]]})
    return {"name": SEMI_SUPERVISED.name, "summary": SEMI_SUPERVISED.summary,
            "options": options, "notes": _notes(options, config.plan.augment),
            "tables": tables, "plots": []}


def run_semi_supervised(grid: Any, config: RunConfig, *, on_round: Any = None,
                        on_progress: Any = None) -> Any:
    """Run the semi-supervised federation on ``grid``; return (and write) its report."""
    from server.app import run_federation

    get_paradigm(SEMI_SUPERVISED_ROUNDS.name)
    stage = dataclasses.replace(config, plan=dataclasses.replace(
        config.plan, paradigm=SEMI_SUPERVISED_ROUNDS.name))
    report = run_federation(grid, stage, on_round=on_round, on_progress=on_progress)
    report.config = dataclasses.replace(config, plan=dataclasses.replace(
        config.plan, run_id=report.config.plan.run_id))
    report.extra["paradigm"] = paradigm_section(report.to_dict(), config)
    report.write(Path(config.out_dir))
    return report


def run_semi_supervised_fold(grid: Any, config: RunConfig, outcome: Any, **kwargs: Any) -> Any:
    """One cross-validation fold (:func:`server.cv.run_fold`'s signature): the fold's rounds
    under the paradigm's node step, evaluated on the held-out labelled patients; the
    paradigm's notes go with the fold."""
    from server.cv import run_fold

    outcome = run_fold(grid, config, outcome, **kwargs)
    options = read_options(SEMI_SUPERVISED, config.plan.paradigm_options)
    outcome.notes.extend(_notes(options, config.plan.augment))
    outcome.notes.append("cross-validation: each hospital's labelled patients follow its "
                         "folds (held-out ones are never trained on, labelled-fraction hides "
                         "labels among the fold's training patients); its unlabelled patients "
                         "train in every fold and are never in a held-out part (no label)")
    return outcome
