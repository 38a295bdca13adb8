"""Queries ``multilabel-metrics`` (pass 1) and ``multilabel-placements`` (pass 2).

They serve plans of the ``multilabel`` task (K = ``num-classes`` findings): the model outputs
K logits and :meth:`common.tasks.Task.predict` the K finding probabilities (sigmoid). A
held-out patient's probability of finding ``l`` is the mean over its images and its label the
maximum of its images' 0/1 labels (:func:`client.queries.scoring.patient_outputs`). A finding
is called present when its probability is at least 0.5. Only sums leave the node
(:mod:`common.stats.multilabel`).

``multilabel-metrics``
    The patient count; per finding, the 2 x 2 table at 0.5 (``tp, fp, fn, tn``; small cells
    suppressed in an exact release) and, where the hospital consents
    (``release-histograms``) and ``with-histograms`` is set, the score histograms of the
    finding's positive and negative patients on the fixed fine edges
    (:func:`common.stats.multilabel.label_histograms`).
``multilabel-placements``
    Per finding, DeLong (1988) placement sums against the pooled histograms the coordinator
    sends back in the ``pooled`` record, and the ``K x K`` cross-products of the scaled
    placements behind the macro AUC's interval
    (:func:`common.stats.multilabel.label_placement_sums`). In an exact release the node
    refuses without histogram consent, with fewer positives (or negatives) of some finding
    than ``min-release-count``, or when the "pooled" histograms are not counts that contain
    its own (as :mod:`client.queries.multiclass` does).

Sensitivities per patient: a patient may be positive for every finding, so it adds 1 to one
cell in each of the K rows of the 2 x 2 tables, of a histogram, and of each count vector
(``sqrt(K)``); each placement sum moves by at most 1 per finding (``sqrt(K)``); the
cross-product matrix by at most ``K`` (scaled placements are below 1 in magnitude).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from client.queries.label_release import (
    check_exact_placements,
    fine_bins,
    pooled_label_histograms,
)
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import HeldOutImages, patient_outputs
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError, DataError
from common.stats.multilabel import LabelHistograms, label_histograms, label_placement_sums

__all__ = ["DECISION_THRESHOLD", "MAX_LABELS", "MultilabelMetricsQuery",
           "MultilabelPlacementsQuery", "label_tables"]

DECISION_THRESHOLD = 0.5
"""A finding is called present when its probability is at least 0.5."""

MAX_LABELS = 100
"""Largest K a multi-label query serves (bounds the size of a release)."""


def num_labels(req: QueryRequest) -> int:
    """K of the plan, for a plan of the multi-label task (a safe refusal otherwise)."""
    if req.plan.task != "multilabel":
        raise ConfigError(
            f"query {req.name!r} with a {req.plan.task} plan",
            safe_reason=f"malformed query: {req.name!r} serves the multilabel task, the plan "
            f"names {req.plan.task}")
    K = req.plan.num_classes
    if not 2 <= K <= MAX_LABELS:
        raise ConfigError(f"num-classes {K} outside 2..{MAX_LABELS}",
                          safe_reason=f"malformed query: num-classes must lie in 2..{MAX_LABELS}")
    return K



def _with_histograms(req: QueryRequest) -> bool:
    return bool(req.config.get(k.WITH_HISTOGRAMS, True)) and req.node.release_histograms


def patient_findings(req: QueryRequest, data: HeldOutImages,
                     K: int) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (patients, K), 0/1 labels (patients, K))`` (kept on the node)."""
    probs, labels = patient_outputs(req, data, k.ARRAYS)
    if probs.ndim != 2 or probs.shape[1] != K or labels.shape != probs.shape:
        raise DataError(f"multilabel predictions of shape {probs.shape}, labels "
                        f"{labels.shape}, expected (n, {K})",
                        safe_reason=f"the model or labels do not hold {K} findings per patient")
    return probs, np.asarray(labels, dtype=np.int64)


def label_tables(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``(K, 4)`` counts ``tp, fp, fn, tn`` per finding at probability >= 0.5."""
    called = np.asarray(probs) >= DECISION_THRESHOLD
    y = np.asarray(labels).astype(bool)
    return np.stack([(called & y).sum(0), (called & ~y).sum(0), (~called & y).sum(0),
                     (~called & ~y).sum(0)], axis=1).astype(np.int64)


@register_query("multilabel-metrics")
class MultilabelMetricsQuery(Query):
    """Pass 1: patients, per-finding 2 x 2 tables and per-finding score histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        K = num_labels(req)
        per_row = math.sqrt(K)
        stats = [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                 Statistic(k.LABEL_CONFUSION, per_row, (K, 4), small_cells=True, integer=True)]
        if _with_histograms(req):
            stats += [Statistic(k.LABEL_HIST_POSITIVE, per_row, (K, fine_bins()), integer=True),
                      Statistic(k.LABEL_HIST_NEGATIVE, per_row, (K, fine_bins()), integer=True)]
        return stats

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        K = num_labels(req)
        probs, labels = patient_findings(req, data, K)
        out: dict[str, Any] = {k.NUM_EXAMPLES: int(labels.shape[0]),
                               k.LABEL_CONFUSION: label_tables(probs, labels)}
        if _with_histograms(req):
            hists = label_histograms(probs, labels)
            out[k.LABEL_HIST_POSITIVE] = hists.positive
            out[k.LABEL_HIST_NEGATIVE] = hists.negative
        return out


def pooled_finding_histograms(req: QueryRequest, K: int) -> LabelHistograms:
    """The pooled pass-1 histograms the coordinator sent back (``pooled`` record)."""
    return pooled_label_histograms(req, K, (k.LABEL_HIST_POSITIVE, k.LABEL_HIST_NEGATIVE),
                                   what="per-finding")


def _check_exact(req: QueryRequest, own: LabelHistograms, pooled: LabelHistograms) -> None:
    check_exact_placements(req, own, pooled, too_few="fewer held-out patients positive (or "
                           "negative) for some finding")


@register_query("multilabel-placements")
class MultilabelPlacementsQuery(Query):
    """Pass 2: per-finding DeLong placement sums against the pooled histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        K = num_labels(req)
        pooled_finding_histograms(req, K)
        per_row = math.sqrt(K)
        return [Statistic(k.LABEL_NUM_POSITIVE, per_row, (K,), integer=True),
                Statistic(k.LABEL_NUM_NEGATIVE, per_row, (K,), integer=True),
                Statistic(k.LABEL_V10_SUM, per_row, (K,)),
                Statistic(k.LABEL_V10_SQ, per_row, (K,)),
                Statistic(k.LABEL_V01_SUM, per_row, (K,)),
                Statistic(k.LABEL_V01_SQ, per_row, (K,)),
                Statistic(k.LABEL_CROSS, float(K), (K, K))]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        K = num_labels(req)
        probs, labels = patient_findings(req, data, K)
        pooled = pooled_finding_histograms(req, K)
        if req.node.stats_noise_multiplier == 0:  # noised: protected (and charged) anyway
            _check_exact(req, label_histograms(probs, labels), pooled)
        sums = label_placement_sums(probs, labels, pooled)
        return {k.LABEL_NUM_POSITIVE: sums.n_pos, k.LABEL_NUM_NEGATIVE: sums.n_neg,
                k.LABEL_V10_SUM: sums.v10_sum, k.LABEL_V10_SQ: sums.v10_sq,
                k.LABEL_V01_SUM: sums.v01_sum, k.LABEL_V01_SQ: sums.v01_sq,
                k.LABEL_CROSS: sums.cross}
