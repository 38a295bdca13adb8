"""Queries ``metrics`` (pass 1) and ``placements`` (pass 2) on one or two scored models.

Both take an optional recalibration map ``beta = [a, b]`` (the coordinator's Platt or
temperature scaling, fitted with ``calibration-glm`` on validation patients): every patient's
score is then ``expit(a + b logit(score))`` before anything is counted, so threshold,
histograms, calibration sums and placements are on the calibrated probabilities (with two
models, ``placements`` maps both).

``metrics``
    At the coordinator's ``threshold``: confusion counts (:func:`common.stats.metrics.
    confusion_counts`), calibration-bin sums and the Brier sum (:func:`common.stats.
    calibration.calibration_bin_sums`, ``calibration-bins`` equal-width bins), the binary
    log-likelihood sum (scores clipped to ``[1e-7, 1 - 1e-7]``), the patient count and, where
    the hospital consents (``release-histograms``) and ``with-histograms`` is set, per-class
    score histograms on the fixed fine edges (:func:`common.stats.bins.class_histograms`).
``placements``
    DeLong placement sums (:func:`common.stats.auc.node_placement_sums`) of one model
    (``arrays``) or two (``arrays`` and ``arrays-b``, for the paired test) against the pooled
    histograms the coordinator sends back in the ``pooled`` record; in an exact release also
    the same sums against the node's *own* histograms (per-site DeLong variance). Refused in an
    exact release when the node has fewer positives or negatives than ``min-release-count``
    (a single patient's placement would be readable from the sum).

Sensitivities per patient: counts 1; per-bin calibration sums 1; Brier 1; log-likelihood
``-log(1e-7)``; placement sums ``sqrt(M)`` and cross-product sums ``M`` for ``M`` models
(placement values lie in [0, 1] and the pooled histograms are the coordinator's input).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from flwr.app import MetricRecord

from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import calibrated_scores, calibration_coefficients, patient_scores
from client.release import Statistic
from common import messages as k
from common.errors import BudgetExceededError, ConfigError, DataError
from common.stats.auc import node_placement_sums
from common.stats.bins import class_histograms, fine_score_edges, uniform_edges
from common.stats.calibration import CALIBRATION_BINS, calibration_bin_sums
from common.stats.metrics import confusion_counts

__all__ = ["LOGLIK_CLIP", "MetricsQuery", "PlacementsQuery"]

LOGLIK_CLIP = 1e-7
"""Scores are clipped to ``[LOGLIK_CLIP, 1 - LOGLIK_CLIP]`` in the log-likelihood sum."""

MAX_BINS = 100_000


def threshold(req: QueryRequest) -> float:
    """The coordinator's decision threshold (default 0.5), a finite number in [0, 1]."""
    value = float(req.config.get(k.THRESHOLD, 0.5))  # type: ignore[arg-type]
    if not (math.isfinite(value) and 0.0 <= value <= 1.0):
        raise ConfigError("threshold must lie in [0, 1]",
                          safe_reason="malformed query: threshold must lie in [0, 1]")
    return value


def int_param(req: QueryRequest, key: str, default: int, *, lo: int = 1,
              hi: int = MAX_BINS) -> int:
    """An integer query parameter within [lo, hi]."""
    raw = req.config.get(key, default)
    if isinstance(raw, bool) or not isinstance(raw, int) or not lo <= raw <= hi:
        raise ConfigError(f"{key} must be an integer in [{lo}, {hi}]",
                          safe_reason=f"malformed query: {key} must be an integer in [{lo}, {hi}]")
    return int(raw)


def _with_histograms(req: QueryRequest) -> bool:
    return bool(req.config.get(k.WITH_HISTOGRAMS, True)) and req.node.release_histograms


def binary_loglik(scores: np.ndarray, labels: np.ndarray) -> float:
    """Sum over patients of ``y log p + (1 - y) log(1 - p)``, ``p`` clipped (see module)."""
    p = np.clip(scores, LOGLIK_CLIP, 1.0 - LOGLIK_CLIP)
    y = labels.astype(np.float64)
    return float(np.sum(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


@register_query("metrics")
class MetricsQuery(Query):
    """Pass 1: confusion counts, calibration sums, Brier, log-likelihood, histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        threshold(req)
        calibration_coefficients(req)
        bins = int_param(req, k.CALIBRATION_BINS, CALIBRATION_BINS, hi=1000)
        stats = [Statistic(k.NUM_EXAMPLES, 1.0, integer=True)]
        stats += [Statistic(key, 1.0, small_cells=True, integer=True)
                  for key in (k.TP, k.FP, k.TN, k.FN)]
        stats += [
            Statistic(k.CAL_COUNT, 1.0, (bins,), small_cells=True, integer=True),
            Statistic(k.CAL_SCORE_SUM, 1.0, (bins,), linked_to=k.CAL_COUNT),
            Statistic(k.CAL_LABEL_SUM, 1.0, (bins,), linked_to=k.CAL_COUNT),
            Statistic(k.BRIER_SUM, 1.0),
            Statistic(k.LOGLIK, -math.log(LOGLIK_CLIP)),
        ]
        if _with_histograms(req):
            nb = fine_score_edges().size - 1
            stats += [Statistic(k.HIST_POSITIVE, 1.0, (nb,), integer=True),
                      Statistic(k.HIST_NEGATIVE, 1.0, (nb,), integer=True)]
        return stats

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        scores, labels = patient_scores(req, data, k.ARRAYS)
        scores = calibrated_scores(req, scores)
        bins = int_param(req, k.CALIBRATION_BINS, CALIBRATION_BINS, hi=1000)
        cm = confusion_counts(scores, labels, threshold(req))
        cal = calibration_bin_sums(scores, labels, edges=uniform_edges(bins))
        out: dict[str, Any] = {
            k.NUM_EXAMPLES: int(scores.size),
            k.TP: cm["tp"], k.FP: cm["fp"], k.TN: cm["tn"], k.FN: cm["fn"],
            k.CAL_COUNT: cal["count"], k.CAL_SCORE_SUM: cal["score_sum"],
            k.CAL_LABEL_SUM: cal["label_sum"], k.BRIER_SUM: cal["sq_error_sum"],
            k.LOGLIK: binary_loglik(scores, labels),
        }
        if _with_histograms(req):
            pos, neg = class_histograms(scores, labels)
            out[k.HIST_POSITIVE], out[k.HIST_NEGATIVE] = pos, neg
        return out


def _model_keys(req: QueryRequest) -> list[str]:
    return [k.ARRAYS, k.ARRAYS_B] if k.ARRAYS_B in req.content else [k.ARRAYS]


def _pooled_hists(req: QueryRequest, models: int) -> list[tuple[np.ndarray, np.ndarray]]:
    record = req.content.get(k.POOLED)
    keys = [(k.HIST_POSITIVE, k.HIST_NEGATIVE), (k.HIST_POSITIVE_B, k.HIST_NEGATIVE_B)][:models]
    nb = fine_score_edges().size - 1
    out = []
    for pk, nk in keys:
        if not isinstance(record, MetricRecord) or pk not in record or nk not in record:
            raise ConfigError("placements query without pooled histograms",
                              safe_reason="malformed query: 'placements' needs the pooled "
                              "histograms of every model")
        pos = np.asarray(record[pk], dtype=np.float64)
        neg = np.asarray(record[nk], dtype=np.float64)
        if pos.shape != (nb,) or neg.shape != (nb,):
            raise ConfigError("pooled histograms of the wrong length",
                              safe_reason=f"malformed query: pooled histograms need {nb} bins")
        out.append((pos, neg))
    return out


def _check_pooled_contains_own(
    req: QueryRequest, scores: list[np.ndarray], labels: np.ndarray,
    pooled: list[tuple[np.ndarray, np.ndarray]],
) -> None:
    """Exact releases: refuse "pooled" histograms that are not counts including the node's own.

    Exact placement sums against arbitrary coordinator-chosen weights would reveal the node's
    score histogram (e.g. mass in one bin counts the positives above a threshold), so the node
    accepts only non-negative integer counts that contain its own histogram bin by bin, and
    only where it consents to releasing histograms at all. (A coordinator could still add
    fabricated counts to isolate bins; exact releases are only as safe as the node's trust in
    the coordinator, which is why they are on the ledger's record at level "exact".)
    """
    if not req.node.release_histograms:
        raise BudgetExceededError(
            "placements query without histogram consent",
            safe_reason="refused: this node does not release score histograms "
            "(release-histograms), on which DeLong placement sums depend",
        )
    for model_scores, (pos, neg) in zip(scores, pooled, strict=True):
        own_pos, own_neg = class_histograms(model_scores, labels)
        for theirs, mine in ((pos, own_pos), (neg, own_neg)):
            if (np.any(theirs < 0) or np.any(theirs != np.round(theirs))
                    or np.any(theirs < np.asarray(mine))):
                raise BudgetExceededError(
                    "pooled histograms do not contain this node's histogram",
                    safe_reason="refused: the pooled histograms sent back are not pooled "
                    "counts that include this node's own release",
                )


@register_query("placements")
class PlacementsQuery(Query):
    """Pass 2: DeLong placement sums against the pooled (and the node's own) histograms."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        m = len(_model_keys(req))
        _pooled_hists(req, m)
        calibration_coefficients(req)
        stats = [
            Statistic(k.NUM_POSITIVE, 1.0, integer=True),
            Statistic(k.NUM_NEGATIVE, 1.0, integer=True),
            Statistic(k.V10_SUM, math.sqrt(m), (m,)),
            Statistic(k.V10_CROSS, float(m), (m, m)),
            Statistic(k.V01_SUM, math.sqrt(m), (m,)),
            Statistic(k.V01_CROSS, float(m), (m, m)),
        ]
        if req.node.stats_noise_multiplier == 0:
            # Against the node's own histograms every placement moves with one patient, so
            # these have no useful sensitivity bound: released exactly or not at all.
            stats += [Statistic(k.SITE_V10_CROSS, float(m), (m, m)),
                      Statistic(k.SITE_V01_CROSS, float(m), (m, m))]
        return stats

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        keys = _model_keys(req)
        scored = [patient_scores(req, data, key) for key in keys]
        labels = scored[0][1]
        scores = [calibrated_scores(req, s) for s, _ in scored]
        exact = req.node.stats_noise_multiplier == 0
        n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
        # A class this node has none of adds nothing to its sums (and no patient): only a
        # class with fewer than the minimum release count is refused. Refusing one-class
        # nodes left the pooled DeLong CI unavailable at many small hospitals.
        if exact and 0 < min(n_pos, n_neg) < req.node.min_release_count:
            raise DataError(
                "too few positives or negatives for placement sums",
                safe_reason="refused: fewer positive or negative held-out patients than this "
                f"node's minimum release count ({req.node.min_release_count})",
            )
        pooled = _pooled_hists(req, len(keys))
        if exact:  # a noised release is protected (and charged) whatever the weights
            _check_pooled_contains_own(req, scores, labels, pooled)
        sums = node_placement_sums(scores, labels, pooled)
        out: dict[str, Any] = {
            k.NUM_POSITIVE: sums["n_pos"], k.NUM_NEGATIVE: sums["n_neg"],
            k.V10_SUM: sums["v10_sum"], k.V10_CROSS: sums["v10_cross"],
            k.V01_SUM: sums["v01_sum"], k.V01_CROSS: sums["v01_cross"],
        }
        if exact and n_pos and n_neg:
            own = [class_histograms(s, labels) for s in scores]
            site = node_placement_sums(scores, labels, own)
            out[k.SITE_V10_CROSS] = site["v10_cross"]
            out[k.SITE_V01_CROSS] = site["v01_cross"]
        elif exact:  # one class only: no AUC of its own, so no site-level DeLong variance
            out[k.SITE_V10_CROSS] = out[k.SITE_V01_CROSS] = np.zeros((len(keys), len(keys)))
        return out
