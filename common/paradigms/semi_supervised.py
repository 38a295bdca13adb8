"""Semi-supervised learning: every node trains on its labelled AND its unlabelled patients.

``--paradigm semi-supervised`` trains the task (binary or multi-class) on a node's labelled
training patients plus its unlabelled ones:

* **unlabelled patients** are (a) those a node holds with no labelled usable study (no valid
  row of ``labels.csv``; :func:`client.data.task_data.load_unlabelled`: those whose
  patient-level split is *train*), and (b), for benchmarking, the training patients whose
  labels ``-P labelled-fraction=F`` hides at the node: all but a deterministic, stratified
  fraction F of them (per class, at least one), chosen at the node, never told to the
  coordinator (:func:`client.paradigms.semi_supervised.labelled_mask`);
* ``-P method=pseudo-label``: the current global model labels the node's unlabelled images
  at the start of each local step; a label whose probability reaches ``-P threshold`` is
  trained on like a real one (cross-entropy), the others get no cross-entropy term;
* ``-P method=consistency``: the prediction on a strongly augmented view of a record is
  pulled towards the prediction on a lightly augmented view of the SAME record (KL divergence,
  the latter held fixed), weighted ``-P consistency-weight``, for every record;
* ``both`` (default) does both.

Privacy: one record per patient, labelled or not; each record's loss depends on that record
only (its two views are made from it, its pseudo-label from it and the global model), so
DP-SGD's per-sample clipping bounds every patient; the accountant plans for, and the ledger
records, every training patient (``NodeTraining.num_patients``: labelled + unlabelled). How
many patients are labelled and how many pseudo-labels were accepted stay at the node (its
log): they are not released.

The coordinator's workflow (:func:`server.paradigms.semi_supervised.run_semi_supervised`)
runs the rounds under the stage paradigm ``semi-supervised-rounds`` (the same node hook) and
adds the report's paradigm section.

Cross-validation (``vesalius federation cv --paradigm semi-supervised``): every fold's rounds
run the same node hook (:func:`server.paradigms.semi_supervised.run_semi_supervised_fold`);
a node's labelled patients follow its folds (``labelled-fraction`` hides labels among the
fold's training patients only), its unlabelled patients train in every fold and, having no
label, are never in a held-out part.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, ParadigmOption, register_paradigm

__all__ = ["METHODS", "SEMI_SUPERVISED", "SEMI_SUPERVISED_ROUNDS", "TASKS", "options"]

TASKS = ("binary", "multiclass")
METHODS = ("pseudo-label", "consistency", "both")
NODE_HOOK = "client.paradigms.semi_supervised:semi_supervised_training"


def options() -> tuple[ParadigmOption, ...]:
    """The options of the paradigm (and of its stage)."""
    return (
        ParadigmOption("method", str, "both", "pseudo-label, consistency or both",
                       choices=METHODS),
        ParadigmOption("labelled-fraction", float, 1.0, "benchmarking: keep the labels of "
                       "this stratified fraction of each node's training patients, hide the "
                       "others' (at the node)", minimum=1e-6, maximum=1.0),
        ParadigmOption("threshold", float, 0.9, "pseudo-label: the global model's "
                       "probability a label needs to be trained on", minimum=0.5, maximum=1.0),
        ParadigmOption("consistency-weight", float, 1.0, "consistency: weight of the "
                       "two-view consistency loss", minimum=0.0, maximum=100.0),
    )


def check(plan: Any, options: Mapping[str, Any]) -> None:
    """Refuse plans the paradigm cannot train (task, model family, cross-validation)."""
    from common.models.registry import get_spec

    if plan.task not in TASKS:
        raise ConfigError(f"--paradigm semi-supervised trains a classifier: --task "
                          f"{' or '.join(TASKS)}, not {plan.task!r}")
    spec = get_spec(plan.model)
    if spec.family == "elm":
        raise ConfigError(f"--paradigm semi-supervised trains by DP-SGD; model {plan.model!r} "
                          "is fitted in closed form; choose e.g. --model cnn")
    if plan.model_phase:
        raise ConfigError("--paradigm semi-supervised trains the whole classifier; drop "
                          "--model-phase")
    if options.get("method") == "consistency" and options.get("consistency-weight") == 0:
        raise ConfigError("method=consistency with consistency-weight=0 trains on the "
                          "labelled patients only; raise consistency-weight or use "
                          "--paradigm supervised")


SEMI_SUPERVISED = register_paradigm(Paradigm(
    name="semi-supervised",
    summary="labelled plus unlabelled patients per hospital: pseudo-labels from the global "
            "model above a confidence threshold and/or consistency under augmentation",
    options=options(),
    workflow="server.paradigms.semi_supervised:run_semi_supervised",
    node=NODE_HOOK,
    cv=True,
    fold="server.paradigms.semi_supervised:run_semi_supervised_fold",
    tasks=TASKS,
    check=check,
))

SEMI_SUPERVISED_ROUNDS = register_paradigm(Paradigm(
    name="semi-supervised-rounds",
    summary="stage of semi-supervised: its training rounds (run --paradigm semi-supervised "
            "instead)",
    options=options(),
    node=NODE_HOOK,
    cv=False,
    tasks=TASKS,
    check=check,
    stage=True,
))
