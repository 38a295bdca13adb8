"""Queries ``multiclass-metrics`` (pass 1) and ``multiclass-placements`` (pass 2).

They serve plans of the ``multiclass`` task (K = ``num-classes``): every held-out patient's
prediction is the mean of its images' K class probabilities and its class the maximum of its
images' labels (:meth:`common.tasks.Task.patient_prediction`); the predicted class is the
arg-max (no threshold). Only sums leave the node (:mod:`common.stats.multiclass`).

``multiclass-metrics``
    The ``K x K`` confusion matrix (rows = true class, columns = arg-max class;
    small cells suppressed in an exact release, like the binary confusion counts), the
    patient count, the multi-class log-likelihood sum (probabilities clipped to
    ``[1e-7, 1]``) and, where the hospital consents (``release-histograms``) and
    ``with-histograms`` is set, the one-vs-rest score histograms of every class on the fixed
    fine edges (:func:`common.stats.multiclass.ovr_histograms`: class ``k``'s probability of
    the class-``k`` patients and of the others).
``multiclass-placements``
    One-vs-rest DeLong placement sums (:func:`common.stats.multiclass.ovr_placement_sums`)
    against the pooled histograms the coordinator sends back in the ``pooled`` record, and the
    ``K x K`` cross-products behind the macro AUC's interval. In an exact release the node
    refuses without histogram consent, with fewer patients of a class (or of the other
    classes) than ``min-release-count``, or when the "pooled" histograms are not counts that
    contain its own (as :mod:`client.queries.metrics` does for the binary placements).

Sensitivities per patient: a patient adds 1 to one confusion cell, to one positive-histogram
cell (its own class) and to ``K - 1`` negative-histogram cells (``sqrt(K - 1)``); placement
sums move by at most 1 per class (``1`` for the positives' sums, ``sqrt(K - 1)`` for the
negatives'); the cross-product matrix by at most ``K`` (scaled placements are below 1 in
magnitude); log-likelihood ``-log(1e-7)``.
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
from client.queries.scoring import patient_probabilities
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError
from common.stats.multiclass import confusion_matrix_counts, ovr_histograms, ovr_placement_sums
from common.stats.multilabel import LabelHistograms

__all__ = ["LOGLIK_CLIP", "MAX_CLASSES", "MulticlassMetricsQuery", "MulticlassPlacementsQuery"]

LOGLIK_CLIP = 1e-7
"""Probabilities are clipped to ``[LOGLIK_CLIP, 1]`` in the log-likelihood sum."""

MAX_CLASSES = 100
"""Largest K a multi-class query serves (bounds the size of a release)."""


def num_classes(req: QueryRequest) -> int:
    """K of the plan, for a plan of the multi-class task."""
    if req.plan.task != "multiclass":
        raise ConfigError(
            f"query {req.name!r} with a {req.plan.task} plan",
            safe_reason=f"malformed query: {req.name!r} serves the multiclass task, the plan "
            f"names {req.plan.task}")
    K = req.plan.num_classes
    if not 2 <= K <= MAX_CLASSES:
        raise ConfigError(f"num-classes {K} outside 2..{MAX_CLASSES}",
                          safe_reason=f"malformed query: num-classes must lie in 2..{MAX_CLASSES}")
    return K



def _with_histograms(req: QueryRequest) -> bool:
    return bool(req.config.get(k.WITH_HISTOGRAMS, True)) and req.node.release_histograms


def multiclass_loglik(probs: np.ndarray, labels: np.ndarray) -> float:
    """Sum over patients of ``log p[label]``, ``p`` clipped to ``[LOGLIK_CLIP, 1]``."""
    p = np.clip(probs[np.arange(labels.size), labels], LOGLIK_CLIP, 1.0)
    return float(np.sum(np.log(p)))


@register_query("multiclass-metrics")
class MulticlassMetricsQuery(Query):
    """Pass 1: confusion matrix, patients, log-likelihood and one-vs-rest histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        K = num_classes(req)
        stats = [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                 Statistic(k.CONFUSION, 1.0, (K, K), small_cells=True, integer=True),
                 Statistic(k.LOGLIK, -math.log(LOGLIK_CLIP))]
        if _with_histograms(req):
            stats += [Statistic(k.OVR_HIST_POSITIVE, 1.0, (K, fine_bins()), integer=True),
                      Statistic(k.OVR_HIST_NEGATIVE, math.sqrt(K - 1), (K, fine_bins()),
                                integer=True)]
        return stats

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        K = num_classes(req)
        probs, labels = patient_probabilities(req, data, k.ARRAYS)
        cm = confusion_matrix_counts(labels, probs.argmax(axis=1), n_classes=K)
        out: dict[str, Any] = {k.NUM_EXAMPLES: int(labels.size), k.CONFUSION: cm.counts,
                               k.LOGLIK: multiclass_loglik(probs, labels)}
        if _with_histograms(req):
            hists = ovr_histograms(probs, labels)
            out[k.OVR_HIST_POSITIVE], out[k.OVR_HIST_NEGATIVE] = hists.positive, hists.negative
        return out


def pooled_ovr_histograms(req: QueryRequest, K: int) -> LabelHistograms:
    """The pooled pass-1 histograms the coordinator sent back (``pooled`` record)."""
    return pooled_label_histograms(req, K, (k.OVR_HIST_POSITIVE, k.OVR_HIST_NEGATIVE),
                                   what="one-vs-rest")


def _check_exact(req: QueryRequest, own: LabelHistograms, pooled: LabelHistograms) -> None:
    check_exact_placements(req, own, pooled, too_few="fewer held-out patients of some class "
                           "(or of the other classes)")


@register_query("multiclass-placements")
class MulticlassPlacementsQuery(Query):
    """Pass 2: one-vs-rest DeLong placement sums against the pooled histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        K = num_classes(req)
        pooled_ovr_histograms(req, K)
        rest = math.sqrt(K - 1)
        return [Statistic(k.OVR_NUM_POSITIVE, 1.0, (K,), integer=True),
                Statistic(k.OVR_NUM_NEGATIVE, rest, (K,), integer=True),
                Statistic(k.OVR_V10_SUM, 1.0, (K,)),
                Statistic(k.OVR_V10_SQ, 1.0, (K,)),
                Statistic(k.OVR_V01_SUM, rest, (K,)),
                Statistic(k.OVR_V01_SQ, rest, (K,)),
                Statistic(k.OVR_CROSS, float(K), (K, K))]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        K = num_classes(req)
        probs, labels = patient_probabilities(req, data, k.ARRAYS)
        pooled = pooled_ovr_histograms(req, K)
        if req.node.stats_noise_multiplier == 0:  # noised: protected (and charged) anyway
            _check_exact(req, ovr_histograms(probs, labels), pooled)
        sums = ovr_placement_sums(probs, labels, pooled)
        return {k.OVR_NUM_POSITIVE: sums.n_pos, k.OVR_NUM_NEGATIVE: sums.n_neg,
                k.OVR_V10_SUM: sums.v10_sum, k.OVR_V10_SQ: sums.v10_sq,
                k.OVR_V01_SUM: sums.v01_sum, k.OVR_V01_SQ: sums.v01_sq,
                k.OVR_CROSS: sums.cross}
