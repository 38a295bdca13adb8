"""Federated deep ensembles: several models trained with their own seeds (or on bootstrap
resamples of the hospitals), combined by averaging their probabilities.

``members`` federated runs of the supervised task, each with its own seed, its own run id
(``<run id>-member-<i>``) and ``out_dir`` subfolder (``member-<i>``), so that every node's
ledger records each member's training. The run's patient-level ε is shared: each member's
target ε is ``ε / members``, so that a hospital spends at most the ε of one single-model run.
``method=bagging`` trains member ``i`` on a bootstrap resample of the hospitals (drawn with
the member's seed): a hospital drawn twice counts twice in that member's FedAvg weights, one
not drawn does not train it. ``combine=average`` averages the members' probabilities,
``combine=weighted`` weights them by their pooled validation AUC (released histograms).

The coordinator's workflow is :func:`server.paradigms.ensemble.run_ensemble`; the nodes
answer one statistics query (:mod:`client.queries.ensemble`) from which the report compares
a single member with the ensemble: AUC, ECE, conformal coverage and the AUROC of uncertainty
(MC-dropout predictive entropy, ensemble disagreement) for detecting errors.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, ParadigmOption, register_paradigm

__all__ = ["ENSEMBLE", "QUERY", "member_epsilon", "member_run_id"]

#: The statistics query of :mod:`client.queries.ensemble`.
QUERY = "ensemble-scores"
#: Config key of the query: the combination weights of the members (a list of floats).
WEIGHTS = "ensemble-weights"
#: Released statistics of the query (flattened arrays; shapes in the query's docstring).
MEMBER_HIST = "ensemble-member-hist"
VARIANT_HIST = "ensemble-variant-hist"
UNCERTAINTY_HIST = "ensemble-uncertainty-hist"
#: Uncertainty measures of ``UNCERTAINTY_HIST``, in order.
UNCERTAINTY_MEASURES = ("single MC-dropout entropy", "ensemble disagreement (variance)",
                        "ensemble predictive entropy")


def member_epsilon(target_epsilon: float, members: int) -> float:
    """Each member's target ε: the run's ε shared equally among the members."""
    return float(target_epsilon) / int(members)


def member_run_id(run_id: str, index: int) -> str:
    """The run id of member ``index`` (derived from the parent run's)."""
    return f"{run_id}-member-{index}"


def _check(plan: Any, options: Mapping[str, Any]) -> None:
    if plan.task != "binary":
        raise ConfigError(f"--paradigm ensemble serves the binary task, not {plan.task!r}; "
                          "run it with --task binary")


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
                       "weighted: weights from the members' pooled validation AUC",
                       choices=("average", "weighted")),
        ParadigmOption("alpha", float, 0.1, "miscoverage of the conformal prediction sets "
                       "(target coverage 1 - alpha)", minimum=0.01, maximum=0.5),
        ParadigmOption("mc-samples", int, 10, "MC-dropout passes of the single member",
                       minimum=2, maximum=100),
    ),
    workflow="server.paradigms.ensemble:run_ensemble",
    cv=False,
    tasks=("binary",),
    check=_check,
))
