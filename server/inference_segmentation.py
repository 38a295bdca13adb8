"""Coordinator side of pooled segmentation inference: per-patient Dice and HD95, pooled.

One query round (``segmentation-metrics``, :mod:`client.queries.segmentation`): every node
computes, per held-out patient, the Dice coefficient (Dice, Ecology 1945; 26:297-302) and the
95th-percentile Hausdorff distance (Huttenlocher et al., IEEE TPAMI 1993; 15:850-863) of the
model's arg-max foreground against the true mask, and releases only their sums and sums of
squares (:class:`common.stats.segmentation.SegmentationSums`). The pooled sums give the mean
Dice and the mean HD95 with t intervals (Student 1908), equal to the same computation on the
pooled per-patient values (:func:`common.stats.segmentation.segmentation_summary`), and each
site's own (:func:`~common.stats.segmentation.per_site_summaries`).

HD95 is in pixels of the model's input grid (images resized to ``image-size``), clipped at
the node to the image diagonal; the HD95 mean is over the patients whose masks are both
non-empty, and the patients left out are counted (both masks empty: nothing to find and
nothing found, Dice 1; exactly one empty: a missed or invented lesion, Dice 0).

A node's refusal or silence never raises: it becomes an entry of ``failures`` and the other
nodes are pooled.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import TrainPlan
from common.errors import VesaliusError
from common.stats.segmentation import SegmentationSums, per_site_summaries, segmentation_summary
from server.inference import QueryRound, query_nodes, secure_note
from server.inference_secure import HIDDEN, is_secure
from server.inference_labels import release_flags

__all__ = ["segmentation_inference"]

log = logging.getLogger(__name__)

_SUMS = (k.NUM_EXAMPLES, k.SEG_SUM_DICE, k.SEG_SUM_DICE_SQ, k.SEG_NUM_HD95, k.SEG_SUM_HD95,
         k.SEG_SUM_HD95_SQ, k.SEG_EMPTY_BOTH, k.SEG_EMPTY_ONE)


def _count(value: Any) -> int:
    return max(int(round(float(value))), 0)


def _sums(values: Mapping[str, Any]) -> SegmentationSums:
    """Estimation sums of released values.

    The estimators read ``n``, ``n_hd95`` and the sums only. Suppressed (exact) or noised
    empty-case counts need not add up to ``n``, so every patient without a defined HD95 is
    counted here as ``n_empty_both`` (the section reports the released counts as they are).
    Sums of non-negative values are clipped at 0 (a noised release can make them negative;
    post-processing costs no privacy, and exact releases are unchanged).
    """
    n = _count(values[k.NUM_EXAMPLES])
    n_hd95 = min(_count(values[k.SEG_NUM_HD95]), n)

    def nonneg(key: str) -> float:
        return max(float(values[key]), 0.0)

    return SegmentationSums(n=n, sum_dice=nonneg(k.SEG_SUM_DICE),
                            sum_dice_sq=nonneg(k.SEG_SUM_DICE_SQ), n_hd95=n_hd95,
                            sum_hd95=nonneg(k.SEG_SUM_HD95),
                            sum_hd95_sq=nonneg(k.SEG_SUM_HD95_SQ),
                            n_empty_both=n - n_hd95, n_empty_one=0)


def _summary(values: Mapping[str, Any], summary: Mapping[str, Any]) -> dict[str, Any]:
    return {"n": summary["n"], "dice": summary["dice"], "hd95": summary["hd95"],
            "n_empty_both": _count(values[k.SEG_EMPTY_BOTH]),
            "n_empty_one": _count(values[k.SEG_EMPTY_ONE])}


def segmentation_inference(
    grid: Grid,
    node_ids: Sequence[int],
    arrays: ArrayRecord,
    plan: TrainPlan,
    *,
    split: str = k.SPLIT_TEST,
    timeout: float,
    alpha: float = 0.05,
    slice_spacing: float = 1.0,
) -> dict[str, Any]:
    """Pooled segmentation inference on one model over the nodes' held-out patients.

    Parameters
    ----------
    grid, node_ids
        Flower grid and the nodes to ask.
    arrays
        The model's weights (``num-classes`` output channels, background included).
    plan
        Run plan (task ``segmentation``, model, image size, CV fields).
    split
        ``"val"``, ``"test"`` or ``"heldout"``.
    timeout
        Seconds for the query round.
    alpha
        1 - confidence level of every interval.
    slice_spacing
        Distance between a patient's stacked slices, in in-plane pixels (HD95 in 3-D).

    Returns
    -------
    dict
        ``task`` ("segmentation"), ``status`` ("completed" / "failed"), ``reason``,
        ``split``, ``alpha``, ``hd95_units`` (pixels of the model's input grid), ``n``,
        ``sites``, ``failures``, ``ledger_heads``, ``noised``, ``suppressed_cells``, ``note``
        and ``segmentation``: ``n``, ``dice`` and ``hd95`` (estimate dicts: ``value``,
        ``lower``, ``upper``, ``se``, ``n``, ``method`` = "t"; ``hd95.n`` counts the patients
        with a defined HD95), ``n_empty_both``, ``n_empty_one`` (released counts) and
        ``per_site`` (a list of the same per site, each with its ``site``).
    """
    base: dict[str, Any] = {**plan.to_record(), k.SPLIT: split,
                            k.SLICE_SPACING: float(slice_spacing)}
    res = query_nodes(grid, node_ids, "segmentation-metrics", base, timeout=timeout,
                      records={k.ARRAYS: arrays}, required=_SUMS)
    out: dict[str, Any] = {"task": "segmentation", "split": split, "alpha": alpha,
                           "hd95_units": "pixels of the model's input grid",
                           "failures": list(res.failures), "ledger_heads": dict(res.heads)}
    if not res.values:
        out.update(status="failed", reason="no node answered the segmentation-metrics query"
                   + (" (every node refused or failed: see failures)" if res.failures else ""))
        return out
    noised, suppressed = release_flags(res)
    pooled_values = res.pooled(_SUMS)
    try:
        pooled = segmentation_summary(_sums(pooled_values), alpha=alpha).as_dict()
        sites = per_site_summaries({str(i): _sums(v) for i, v in res.values.items()},
                                   alpha=alpha)
    except (VesaliusError, ValueError, ZeroDivisionError) as exc:  # noised sums: never raise
        out.update(status="failed", reason=f"segmentation metrics: {exc}", noised=noised)
        return out
    if pooled["n"] == 0:
        out.update(status="failed", reason="no held-out patients in the pooled statistics",
                   noised=noised)
        return out
    notes = []
    if res.failures:
        notes.append(f"pooled over the {len(res.nodes())} of {len(node_ids)} sites that answered")
    if suppressed and not noised:
        notes.append(f"{suppressed} small empty-case count(s) were suppressed (released as 0)")
    per_site: list[dict[str, Any]] | str = HIDDEN if is_secure(res) else []
    for nid, values in [] if is_secure(res) else res.values.items():
        per_site.append({"site": res.sites[nid],  # type: ignore[union-attr]
                         **_summary(values, sites[str(nid)].as_dict())})
    out.update(status="completed", reason="", n=pooled["n"],
               sites=res.site_names(), noised=noised,
               suppressed_cells=suppressed, note="; ".join(notes))
    out["segmentation"] = {**_summary(pooled_values, pooled), "per_site": per_site}
    if res.secure is not None:
        out["secure_aggregation"] = secure_note(res)
    return out
