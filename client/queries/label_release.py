"""What the multi-class and multi-label placement queries share (pass 2 of their AUCs).

Both receive the pooled per-label score histograms back from the coordinator (the
``pooled`` record) and, in an exact release, must refuse without histogram consent, with
fewer patients of a label (or of the rest) than the node's minimum release count, or when
the "pooled" histograms are not counts that contain the node's own
(:mod:`client.queries.multiclass`, :mod:`client.queries.multilabel`).
"""

from __future__ import annotations

import numpy as np
from flwr.app import MetricRecord

from client.queries.registry import QueryRequest
from common import messages as k
from common.errors import BudgetExceededError, ConfigError, DataError
from common.stats.bins import fine_score_edges
from common.stats.multilabel import LabelHistograms

__all__ = ["check_exact_placements", "fine_bins", "pooled_label_histograms"]


def fine_bins() -> int:
    """Bins of the fixed fine score histograms."""
    return int(fine_score_edges().size - 1)


def pooled_label_histograms(req: QueryRequest, K: int, keys: tuple[str, str], *,
                            what: str) -> LabelHistograms:
    """The pooled pass-1 histograms (``keys``: positive, negative) the coordinator sent back.

    ``what`` names them in the refusal ("one-vs-rest", "per-finding").
    """
    record = req.content.get(k.POOLED)
    if not isinstance(record, MetricRecord) or any(key not in record for key in keys):
        raise ConfigError(f"{req.name} without pooled histograms",
                          safe_reason=f"malformed query: {req.name!r} needs the pooled "
                          f"{what} histograms")
    bins = fine_bins()
    arrays = [np.asarray(record[key], dtype=np.float64) for key in keys]
    if any(a.size != K * bins for a in arrays):
        raise ConfigError("pooled histograms of the wrong size",
                          safe_reason=f"malformed query: pooled histograms need {K} x {bins} "
                          "bins")
    if any(np.any(a < 0) or np.any(a != np.round(a)) for a in arrays):
        raise BudgetExceededError(
            "pooled histograms are not counts",
            safe_reason="refused: the pooled histograms sent back are not counts")
    pos, neg = (a.reshape(K, bins) for a in arrays)
    return LabelHistograms(positive=pos, negative=neg)


def check_exact_placements(req: QueryRequest, own: LabelHistograms, pooled: LabelHistograms,
                           *, too_few: str) -> None:
    """Exact releases: consent, minimum counts per label, pooled counts containing our own.

    ``too_few`` is the refusal's words for the minimum-count case (e.g. "fewer held-out
    patients of some class (or of the other classes)").
    """
    if not req.node.release_histograms:
        raise BudgetExceededError(
            f"{req.name} without histogram consent",
            safe_reason="refused: this node does not release score histograms "
            "(release-histograms), on which DeLong placement sums depend")
    n_pos, n_neg = own.positive.sum(axis=1), own.negative.sum(axis=1)
    if min(int(n_pos.min()), int(n_neg.min())) < req.node.min_release_count:
        raise DataError(
            "too few patients of a label for placement sums",
            safe_reason=f"refused: {too_few} than this node's minimum release count "
            f"({req.node.min_release_count})")
    if np.any(pooled.positive < own.positive) or np.any(pooled.negative < own.negative):
        raise BudgetExceededError(
            "pooled histograms do not contain this node's histograms",
            safe_reason="refused: the pooled histograms sent back are not pooled counts that "
            "include this node's own release")
