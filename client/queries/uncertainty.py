"""Queries ``conformal`` and ``entropy``: uncertainty statistics of the held-out patients.

``conformal``
    Without ``conformal-qhat`` (calibration pass): the histogram of the nonconformity scores
    ``1 - p(true class)`` on ``value-bins`` equal-width bins of [0, 1]
    (:func:`common.stats.conformal.nonconformity_histogram`; default 10,000 bins). A fine
    histogram: released only where the hospital consents (``release-histograms``) and exempt
    from small-cell suppression, like the score histograms. With ``conformal-qhat``
    (evaluation pass): the patient count, the number covered by their conformal set and the
    counts of set sizes 0, 1, 2 (:func:`common.stats.conformal.coverage_counts`).
``entropy``
    Per-patient predictive entropy (:func:`common.stats.uncertainty.predictive_entropy`) of
    ``mc-samples`` MC-dropout passes of ``arrays``, or of a deep ensemble sent as ArrayRecords
    ``member-0``, ``member-1``, ...; released as count, sum, sum of squares and a
    ``value-bins`` histogram on ``[0, ln 2]`` (:func:`common.stats.uncertainty.
    entropy_node_stats`).

Sensitivities: counts and histograms 1; entropy sum ``ln 2``; sum of squares ``(ln 2)^2``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from client.queries.metrics import int_param
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import model_arrays, patient_samples, patient_scores
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError
from common.stats.conformal import (
    CONFORMAL_BINS,
    conformal_edges,
    coverage_counts,
    nonconformity_histogram,
    nonconformity_scores,
)
from common.stats.uncertainty import (
    ENTROPY_BINS,
    entropy_edges,
    entropy_node_stats,
    predictive_entropy,
)

__all__ = ["ConformalQuery", "EntropyQuery"]

MAX_PASSES = 200
MAX_MEMBERS = 32


def _qhat(req: QueryRequest) -> float | None:
    raw = req.config.get(k.CONFORMAL_QHAT)
    if raw is None:
        return None
    value = float(raw)  # type: ignore[arg-type]
    if math.isnan(value):
        raise ConfigError("conformal-qhat is NaN",
                          safe_reason="malformed query: conformal-qhat must be a number")
    return value


@register_query("conformal")
class ConformalQuery(Query):
    """Calibration histogram of nonconformity scores, or coverage counts at a threshold."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        model_arrays(req, k.ARRAYS)
        if _qhat(req) is not None:
            return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                    Statistic(k.COVERED, 1.0, small_cells=True, integer=True),
                    Statistic(k.SET_SIZE_COUNTS, 1.0, (3,), small_cells=True, integer=True)]
        if not req.node.release_histograms:
            raise ConfigError(
                "conformal calibration histogram without consent",
                safe_reason="refused: this node does not release fine histograms "
                "(release-histograms is off)",
            )
        bins = int_param(req, k.VALUE_BINS, CONFORMAL_BINS)
        return [Statistic(k.NONCONFORMITY_HIST, 1.0, (bins,), integer=True)]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        scores, labels = patient_scores(req, data, k.ARRAYS)
        qhat = _qhat(req)
        if qhat is not None:
            c = coverage_counts(scores, labels, qhat)
            return {k.NUM_EXAMPLES: c["n"], k.COVERED: c["covered"],
                    k.SET_SIZE_COUNTS: np.array([c["set_size_0"], c["set_size_1"],
                                                 c["set_size_2"]])}
        bins = int_param(req, k.VALUE_BINS, CONFORMAL_BINS)
        hist = nonconformity_histogram(nonconformity_scores(scores, labels),
                                       edges=conformal_edges(bins))
        return {k.NONCONFORMITY_HIST: hist}


def _members(req: QueryRequest) -> list[str]:
    keys = sorted((key for key in req.content if key.startswith(k.ENSEMBLE_PREFIX)),
                  key=lambda s: int(s[len(k.ENSEMBLE_PREFIX):])
                  if s[len(k.ENSEMBLE_PREFIX):].isdigit() else -1)
    if len(keys) > MAX_MEMBERS or any(not s[len(k.ENSEMBLE_PREFIX):].isdigit() for s in keys):
        raise ConfigError("bad ensemble", safe_reason=f"malformed query: at most {MAX_MEMBERS} "
                          f"ensemble members named {k.ENSEMBLE_PREFIX}<i>")
    return keys


@register_query("entropy")
class EntropyQuery(Query):
    """Predictive-entropy sums and histogram (MC-dropout or deep ensemble)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        if not _members(req):
            model_arrays(req, k.ARRAYS)
            int_param(req, k.MC_SAMPLES, 20, lo=2, hi=MAX_PASSES)
        bins = int_param(req, k.VALUE_BINS, ENTROPY_BINS, hi=1000)
        ln2 = math.log(2.0)
        return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                Statistic(k.ENTROPY_SUM, ln2),
                Statistic(k.ENTROPY_SQ_SUM, ln2 * ln2),
                Statistic(k.ENTROPY_HIST, 1.0, (bins,), small_cells=True, integer=True)]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        members = _members(req)
        if members:
            samples = patient_samples(req, data, members, passes=1)
        else:
            passes = int_param(req, k.MC_SAMPLES, 20, lo=2, hi=MAX_PASSES)
            samples = patient_samples(req, data, [k.ARRAYS], passes=passes)
        bins = int_param(req, k.VALUE_BINS, ENTROPY_BINS, hi=1000)
        st = entropy_node_stats(predictive_entropy(samples), edges=entropy_edges(bins=bins))
        return {k.NUM_EXAMPLES: st["n"], k.ENTROPY_SUM: st["sum"],
                k.ENTROPY_SQ_SUM: st["sum_sq"], k.ENTROPY_HIST: st["hist"]}


