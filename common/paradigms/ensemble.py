"""Federated deep ensembles: several models trained with their own seeds (or on bootstrap
resamples of the hospitals), combined by averaging their probabilities.

``members`` federated runs of the supervised task, each with its own seed, its own run id
(``<run id>-member-<i>``) and ``out_dir`` subfolder (``member-<i>``), so that every node's
ledger records each member's training. The run's patient-level ε is shared: each member's
target ε is ``ε / members``, so that a hospital spends at most the ε of one single-model run.
``method=bagging`` trains member ``i`` on a bootstrap resample of the hospitals (drawn with
the member's seed): a hospital drawn twice counts twice in that member's FedAvg weights, one
not drawn does not train it. ``combine=average`` averages the members' probabilities,
``combine=weighted`` weights them by their pooled validation AUC (released histograms),
``combine=stacker`` learns the combination: a linear head over the members' logits, trained
federated with DP-SGD on every hospital's *validation* patients (never its test patients;
stage paradigm ``ensemble-stacker``, node step :mod:`client.paradigms.ensemble`). The stacker
is one more release on every ledger (run id ``<run id>-stacker``): the run's ε is then split
as ``stacker-share · ε`` for the stacker and ``(1 - stacker-share) · ε / members`` per member.

The coordinator's workflow is :func:`server.paradigms.ensemble.run_ensemble`; the nodes
answer one statistics query (:mod:`client.queries.ensemble`) from which the report compares
a single member with the ensemble: AUC, ECE, conformal coverage and the AUROC of uncertainty
(ensemble disagreement and entropy; with ``-P uncertainty=mc-dropout|both``, member 0's
MC-dropout mean and entropy, which need dropout: the model's own layers or ``-P dropout=p``,
dropout before the members' last linear layer in training, stage ``ensemble-member``, and in
the passes) for detecting errors. The report's Result headline is the ensemble's pooled test
AUC (DeLong interval on the binned scores).

``vesalius federation cv --paradigm ensemble`` trains the members per fold on the fold's
training patients (run ids ``<fold run id>-member-<i>``) and reports the ensemble's held-out
AUC per fold and pooled over folds (:mod:`server.paradigms.cv_ensemble`); only
``combine=average`` with ``method=seeds`` (weighted and stacker need validation patients, which
a fold trains on).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import (
    Paradigm,
    ParadigmOption,
    canonical_options,
    register_paradigm,
)

__all__ = ["ENSEMBLE", "MEMBER", "QUERY", "STACKER", "member_epsilon", "member_paradigm", "member_run_id",
           "stacker_epsilon", "stacker_run_id"]

#: The statistics query of :mod:`client.queries.ensemble`.
QUERY = "ensemble-scores"
#: Config key of the query: the combination weights of the members (a list of floats).
WEIGHTS = "ensemble-weights"
#: Released statistics of the query (flattened arrays; shapes in the query's docstring).
MEMBER_HIST = "ensemble-member-hist"
VARIANT_HIST = "ensemble-variant-hist"
UNCERTAINTY_HIST = "ensemble-uncertainty-hist"
#: Config key of the query: dropout rate of member 0's MC-dropout passes, before its last
#: linear layer (0 or absent: the model's own dropout layers).
MC_DROPOUT = "mc-dropout"
#: Config key of the query: a trained stacker's head ``[w_1, ..., w_M, b]`` (the ensemble's
#: probability is ``sigmoid(b + sum_i w_i logit p_i)``; absent: the weighted average).
STACKER_HEAD = "ensemble-stacker"
#: Config key of the query: the operating thresholds ``[single, ensemble, MC-dropout mean]``
#: at which a patient counts as misclassified in ``UNCERTAINTY_HIST`` (absent: 0.5 each);
#: the coordinator chooses them on the validation patients (Youden's J).
THRESHOLDS = "ensemble-thresholds"
#: Uncertainty measures of ``UNCERTAINTY_HIST``, in order.
UNCERTAINTY_MEASURES = ("single MC-dropout entropy", "ensemble disagreement (variance)",
                        "ensemble predictive entropy")


def member_epsilon(target_epsilon: float, members: int, stacker_share: float = 0.0) -> float:
    """Each member's target ε: what the stacker leaves of the run's ε, shared equally."""
    return float(target_epsilon) * (1.0 - float(stacker_share)) / int(members)


def stacker_epsilon(target_epsilon: float, stacker_share: float) -> float:
    """The stacker's target ε: its share of the run's ε."""
    return float(target_epsilon) * float(stacker_share)


def member_run_id(run_id: str, index: int) -> str:
    """The run id of member ``index`` (derived from the parent run's)."""
    return f"{run_id}-member-{index}"


def stacker_run_id(run_id: str) -> str:
    """The run id of the stacker's training (derived from the parent run's)."""
    return f"{run_id}-stacker"


def _check(plan: Any, options: Mapping[str, Any]) -> None:
    if plan.task != "binary":
        raise ConfigError(f"--paradigm ensemble serves the binary task, not {plan.task!r}; "
                          "run it with --task binary")
    if options.get("uncertainty", "disagreement") != "disagreement" \
            and float(options.get("dropout", 0.0)) <= 0 and not _model_has_dropout(plan):
        raise ConfigError(f"-P uncertainty={options['uncertainty']} needs dropout, and model "
                          f"{plan.model!r} has no dropout layer: add -P dropout=0.2 (dropout "
                          "before the members' last linear layer) or use "
                          "-P uncertainty=disagreement")


def _model_has_dropout(plan: Any) -> bool:
    from client.paradigms.ensemble import has_dropout
    from common.models import build_model
    from common.tasks.federated import spatial_dims

    return has_dropout(build_model(plan.model, in_channels=1, num_classes=2,
                                   image_size=plan.image_size,
                                   spatial_dims=spatial_dims(plan.samples)))


def member_paradigm(dropout: float) -> tuple[str, str]:
    """``(paradigm, options)`` of a member's sub-run: supervised, or with dropout."""
    if dropout <= 0:
        return "supervised", ""
    return "ensemble-member", canonical_options({"dropout": float(dropout)})


ENSEMBLE = register_paradigm(Paradigm(
    name="ensemble",
    summary="federated deep ensemble: members with their own seeds (or bootstrap resamples "
            "of the hospitals) share the run's ε; probabilities averaged",
    options=(
        ParadigmOption("members", int, 3, "number of ensemble members (each a federated run "
                       "with target ε = ε / members)", minimum=2, maximum=16),
        ParadigmOption("method", str, "seeds", "seeds: every hospital trains every member; "
                       "bagging: each member on a bootstrap resample of the hospitals",
                       choices=("seeds", "bagging")),
        ParadigmOption("combine", str, "average", "average: mean of the members' probabilities; "
                       "weighted: weights from the members' pooled validation AUC; stacker: a "
                       "linear head over the members' logits trained federated with DP-SGD on "
                       "the validation patients", choices=("average", "weighted", "stacker")),
        ParadigmOption("stacker-share", float, 0.2, "combine=stacker: the stacker's share of "
                       "the run's ε (the members share the rest)", minimum=0.05, maximum=0.5),
        ParadigmOption("stacker-rounds", int, 3, "combine=stacker: federated rounds of the "
                       "stacker's DP-SGD", minimum=1, maximum=50),
        ParadigmOption("alpha", float, 0.1, "miscoverage of the conformal prediction sets "
                       "(target coverage 1 - alpha)", minimum=0.01, maximum=0.5),
        ParadigmOption("mc-samples", int, 10, "MC-dropout passes of the single member",
                       minimum=2, maximum=100),
        ParadigmOption("uncertainty", str, "disagreement", "uncertainty for the prediction "
                       "sets and error detection: the members' disagreement, MC-dropout of "
                       "member 0 (needs dropout: the model's own or -P dropout=p), or both",
                       choices=("disagreement", "mc-dropout", "both")),
        ParadigmOption("dropout", float, 0.0, "dropout rate before the members' last linear "
                       "layer, in their training and the MC-dropout passes (0: none added)",
                       minimum=0.0, maximum=0.7),
    ),
    workflow="server.paradigms.ensemble:run_ensemble",
    fold="server.paradigms.cv_ensemble:run_ensemble_fold",
    cv=True,
    tasks=("binary",),
    check=_check,
))


STACKER = register_paradigm(Paradigm(
    name="ensemble-stacker",
    summary="stage of ensemble (combine=stacker): DP-SGD rounds of a linear head over the "
            "frozen members' logits on the validation patients (run --paradigm ensemble)",
    options=(ParadigmOption("members", int, 3, "number of frozen members in the arrays",
                            minimum=2, maximum=16),),
    node="client.paradigms.ensemble:stacker_training",
    cv=False,
    tasks=("binary",),
    stage=True,
))

MEMBER = register_paradigm(Paradigm(
    name="ensemble-member",
    summary="stage of ensemble (-P dropout=p): a member's supervised rounds with dropout "
            "before the model's last linear layer (run --paradigm ensemble)",
    options=(ParadigmOption("dropout", float, 0.1, "dropout rate", minimum=0.0, maximum=0.7),),
    node="client.paradigms.ensemble:member_training",
    cv=False,
    tasks=("binary",),
    stage=True,
))
