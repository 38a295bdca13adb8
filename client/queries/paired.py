"""Query ``mcnemar``: the paired correctness table of two models on the same patients.

At the coordinator's ``threshold``, for the models ``arrays`` (A) and ``arrays-b`` (B): the
counts of held-out patients both models classify correctly, only A, only B, and neither
(:func:`common.stats.hypothesis.discordant_counts`). Each patient falls in one cell
(sensitivity 1 per count); the cells are contingency counts, so small-cell suppression
applies to an exact release.
"""

from __future__ import annotations

from typing import Any

from client.queries.metrics import threshold
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import model_arrays, patient_scores
from client.release import Statistic
from common import messages as k
from common.stats.hypothesis import discordant_counts

__all__ = ["McNemarQuery"]

_CELLS = ((k.BOTH_CORRECT, "both_correct"), (k.ONLY_A_CORRECT, "b"),
          (k.ONLY_B_CORRECT, "c"), (k.BOTH_WRONG, "both_wrong"))


@register_query("mcnemar")
class McNemarQuery(Query):
    """Counts of patients right/wrong under two models (McNemar's b and c among them)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        threshold(req)
        model_arrays(req, k.ARRAYS)
        model_arrays(req, k.ARRAYS_B)
        return [Statistic(key, 1.0, small_cells=True, integer=True) for key, _ in _CELLS]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        scores_a, labels = patient_scores(req, data, k.ARRAYS)
        scores_b, _ = patient_scores(req, data, k.ARRAYS_B)
        table = discordant_counts(scores_a, scores_b, labels, threshold=threshold(req))
        return {key: table[name] for key, name in _CELLS}
