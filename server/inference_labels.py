"""What the multi-class and multi-label pooled inference share: per-label histogram rounds.

Both tasks score every patient once per label (a class one-vs-rest, or a finding) and pool
per-label score histograms (pass 1) and DeLong placement sums (pass 2) over the nodes
(:mod:`common.stats.multilabel`). They differ only in their wire keys (:class:`LabelKeys`)
and their words ("class", "finding"); the helpers here read a round's replies into
:class:`~common.stats.multilabel.LabelHistograms` and
:class:`~common.stats.multilabel.LabelPlacementSums`, build the ``pooled`` record a pass-2
query carries, and the ROC data a report draws.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import MetricRecord

from common import messages as k
from common.stats.histogram import compress_histograms
from common.stats.multilabel import LabelHistograms, LabelPlacementSums
from server.inference import QueryRound

__all__ = ["LabelKeys", "OVR_KEYS", "counts", "histogram_aucs", "node_histograms",
           "placement_sums", "pooled_histograms", "pooled_record", "release_flags", "roc"]


@dataclass(frozen=True)
class LabelKeys:
    """The wire keys of one task's per-label histograms and placement sums."""

    hist_positive: str
    hist_negative: str
    num_positive: str
    num_negative: str
    v10_sum: str
    v10_sq: str
    v01_sum: str
    v01_sq: str
    cross: str

    @property
    def placements(self) -> tuple[str, ...]:
        """The keys of a pass-2 (placements) reply."""
        return (self.num_positive, self.num_negative, self.v10_sum, self.v10_sq,
                self.v01_sum, self.v01_sq, self.cross)


OVR_KEYS = LabelKeys(k.OVR_HIST_POSITIVE, k.OVR_HIST_NEGATIVE, k.OVR_NUM_POSITIVE,
                     k.OVR_NUM_NEGATIVE, k.OVR_V10_SUM, k.OVR_V10_SQ, k.OVR_V01_SUM,
                     k.OVR_V01_SQ, k.OVR_CROSS)
"""The multi-class (one-vs-rest) keys."""


def release_flags(res: QueryRound) -> tuple[bool, int]:
    """``(any node noised, suppressed cells over all nodes)`` of one query round."""
    noised = any(bool(v.get(k.NOISED, 0)) for v in res.values.values())
    suppressed = int(sum(int(v.get(k.SUPPRESSED_CELLS, 0)) for v in res.values.values()))
    return noised, suppressed


def counts(values: Any, shape: tuple[int, ...]) -> np.ndarray:
    """Released (possibly noised) counts as non-negative integers of ``shape``."""
    return np.maximum(np.rint(np.asarray(values, dtype=np.float64)), 0).reshape(shape)


def node_histograms(res: QueryRound, K: int, keys: LabelKeys) -> dict[int, LabelHistograms]:
    """Each node's released ``K x bins`` histograms (nodes that released none left out)."""
    out = {}
    for nid, v in res.values.items():
        if keys.hist_positive in v and keys.hist_negative in v:
            pos = counts(v[keys.hist_positive], (K, -1))
            out[nid] = LabelHistograms(positive=pos,
                                       negative=counts(v[keys.hist_negative], pos.shape))
    return out


def pooled_histograms(node_hists: Mapping[int, LabelHistograms]) -> LabelHistograms:
    """The sum of the nodes' histograms (at least one node)."""
    first = next(iter(node_hists.values()))
    return sum(node_hists.values(), start=LabelHistograms(
        positive=np.zeros_like(first.positive), negative=np.zeros_like(first.negative)))


def pooled_record(hists: LabelHistograms, keys: LabelKeys) -> MetricRecord:
    """The ``pooled`` record a pass-2 query carries back to the nodes."""
    return MetricRecord({keys.hist_positive: [int(x) for x in hists.positive.ravel()],
                         keys.hist_negative: [int(x) for x in hists.negative.ravel()]})


def placement_sums(res: QueryRound, K: int, keys: LabelKeys) -> LabelPlacementSums:
    """The pooled pass-2 placement sums."""
    pooled = res.pooled(keys.placements)
    return LabelPlacementSums(
        n_pos=counts(pooled[keys.num_positive], (K,)),
        n_neg=counts(pooled[keys.num_negative], (K,)),
        v10_sum=np.asarray(pooled[keys.v10_sum]).reshape(K),
        v10_sq=np.asarray(pooled[keys.v10_sq]).reshape(K),
        v01_sum=np.asarray(pooled[keys.v01_sum]).reshape(K),
        v01_sq=np.asarray(pooled[keys.v01_sq]).reshape(K),
        cross=np.asarray(pooled[keys.cross]).reshape(K, K))


def roc(hists: LabelHistograms) -> list[dict[str, list[int]]]:
    """Per label, the pooled histograms without their empty bins (for ROC plots)."""
    out = []
    for pos, neg in zip(hists.positive, hists.negative, strict=True):
        p, q = compress_histograms(pos, neg)
        out.append({"pos": [int(v) for v in p], "neg": [int(v) for v in q]})
    return out


def histogram_aucs(hists: LabelHistograms, per: str) -> dict[str, Any]:
    """Per-label (key ``per``: ``per_class`` or ``per_label``) and macro AUC of the binned
    scores, without intervals (when the placement round is unavailable)."""
    aucs = hists.aucs()
    n = int(hists.positive[0].sum() + hists.negative[0].sum())

    def est(v: float) -> dict[str, Any]:
        return {"value": float(v) if math.isfinite(v) else None, "lower": None, "upper": None,
                "se": None, "n": n, "method": "histogram"}

    return {"macro": est(float(np.mean(aucs))), per: [est(float(a)) for a in aucs],
            "p_values": None, "p_holm": None}
