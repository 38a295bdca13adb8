"""Query ``ordinal-metrics``: the confusion matrix of true against predicted grades.

It serves plans of the ``ordinal`` task (K = ``num-classes`` grades ``0 .. K-1``). The model
outputs K-1 cumulative logits; :meth:`common.tasks.Task.predict` turns them into
``P(grade > k)`` for ``k = 0 .. K-2`` (sigmoid). A held-out patient's prediction is the mean of
its images' probabilities and its grade the maximum of its images' grades
(:func:`client.queries.scoring.patient_outputs`). **The predicted grade of a patient is the
number of thresholds whose mean probability** ``P(grade > k)`` **is at least 0.5**
(:func:`predicted_grades`): the usual read-out of a cumulative-link model (Cao, Mirjalili &
Raschka 2020), which needs no monotonicity of the K-1 probabilities.

``ordinal-metrics``
    The ``K x K`` confusion matrix (rows = true grade, columns = predicted grade; small cells
    suppressed in an exact release, like the multi-class confusion matrix) and the patient
    count. Everything the coordinator reports (weighted kappa, Cohen 1968, with the
    Fleiss, Cohen & Everitt 1969 interval; mean absolute grade error; accuracy, per-grade
    sensitivity and precision) is a function of the pooled matrix
    (:mod:`common.stats.ordinal`, :mod:`common.stats.multiclass`).

Sensitivities per patient: a patient adds 1 to the patient count and 1 to one confusion cell.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import HeldOutImages, patient_outputs
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError, DataError
from common.stats.multiclass import confusion_matrix_counts

__all__ = ["DECISION_THRESHOLD", "MAX_GRADES", "OrdinalMetricsQuery", "num_grades",
           "predicted_grades"]

DECISION_THRESHOLD = 0.5
"""A threshold ``grade > k`` counts towards the predicted grade when ``P(grade > k) >= 0.5``."""

MAX_GRADES = 100
"""Largest K an ordinal query serves (bounds the size of a release)."""


def num_grades(req: QueryRequest) -> int:
    """K of the plan, for a plan of the ordinal task (a safe refusal otherwise)."""
    if req.plan.task != "ordinal":
        raise ConfigError(
            f"query {req.name!r} with a {req.plan.task} plan",
            safe_reason=f"malformed query: {req.name!r} serves the ordinal task, the plan "
            f"names {req.plan.task}")
    K = req.plan.num_classes
    if not 2 <= K <= MAX_GRADES:
        raise ConfigError(f"num-classes {K} outside 2..{MAX_GRADES}",
                          safe_reason=f"malformed query: num-classes must lie in 2..{MAX_GRADES}")
    return K


def predicted_grades(exceed: np.ndarray) -> np.ndarray:
    """Predicted grade per patient: thresholds with mean ``P(grade > k) >= 0.5``.

    Parameters
    ----------
    exceed
        ``(patients, K - 1)`` mean probabilities ``P(grade > k)``, ``k = 0 .. K-2``.

    Returns
    -------
    numpy.ndarray
        int64 grades in ``0 .. K - 1``.
    """
    p = np.asarray(exceed, dtype=np.float64)
    if p.ndim != 2:
        raise DataError("ordinal predictions must be (patients, K - 1)",
                        safe_reason="the model's ordinal outputs have the wrong shape")
    return (p >= DECISION_THRESHOLD).sum(axis=1).astype(np.int64)


def patient_grades(req: QueryRequest, data: HeldOutImages, K: int) -> tuple[np.ndarray,
                                                                             np.ndarray]:
    """``(true grades, predicted grades)`` of the held-out patients (kept on the node)."""
    exceed, grades = patient_outputs(req, data, k.ARRAYS)
    if exceed.ndim != 2 or exceed.shape[1] != K - 1:
        raise DataError(f"ordinal predictions of shape {exceed.shape}, expected (n, {K - 1})",
                        safe_reason=f"the model does not output {K - 1} ordinal thresholds")
    return np.asarray(grades, dtype=np.int64).reshape(-1), predicted_grades(exceed)


@register_query("ordinal-metrics")
class OrdinalMetricsQuery(Query):
    """The confusion matrix of true against predicted grades, and the patient count."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        K = num_grades(req)
        return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                Statistic(k.CONFUSION, 1.0, (K, K), small_cells=True, integer=True)]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        K = num_grades(req)
        truth, predicted = patient_grades(req, data, K)
        cm = confusion_matrix_counts(truth, predicted, n_classes=K)
        return {k.NUM_EXAMPLES: int(truth.size), k.CONFUSION: cm.counts}
