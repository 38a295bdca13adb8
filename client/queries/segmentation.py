"""Query ``segmentation-metrics``: sums of per-patient Dice and HD95 of the held-out patients.

It serves plans of the ``segmentation`` task. The model (e.g. the U-Net,
:mod:`common.models.unet`) returns ``[N, K, *spatial]`` logits; a pixel is predicted
foreground where its arg-max class is ``>= 1`` (all lesion classes as one binary mask), and
the true foreground is the mask's classes ``>= 1``. A patient's samples (2-D slices, or
volumes) are stacked along the first axis in the order of the split's rows into one volume,
and :func:`common.stats.segmentation.case_metrics` gives its Dice (Dice 1945) and HD95
(Huttenlocher et al. 1993).

Units. HD95 is measured **in pixels of the model's input grid** (the image resized to
``image-size``): the in-plane spacing is 1; the distance between stacked slices is the
coordinator's ``slice-spacing`` (in those pixels, default 1). The split holds no (0028,0030)
Pixel Spacing, so millimetres are not available at this point.

Released (:class:`common.stats.segmentation.SegmentationSums`): the patient count, the sums of
Dice and Dice², the patients with a defined HD95 and the sums of HD95 and HD95², and the
patients whose masks were both empty / exactly one empty. Those two counts are contingency
counts: in an exact release their cells of 1 .. ``min-release-count - 1`` patients are
suppressed (:mod:`client.release`, rule 2).

Sensitivities per patient: the counts 1 each; Dice lies in [0, 1], so ``sum Dice`` and
``sum Dice²`` 1; HD95 is clipped to the image diagonal ``D`` (:func:`hd95_clip`:
``image-size * sqrt(2)`` for 2-D samples, ``* sqrt(3)`` for volumes), so ``sum HD95`` ``D``
and ``sum HD95²`` ``D²``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import HeldOutImages, load_model
from client.release import Statistic
from common import messages as k
from common.config import TrainPlan
from common.errors import ConfigError, DataError
from common.stats.segmentation import CaseMetrics, case_metrics, segmentation_node_stats

__all__ = ["DEFAULT_SLICE_SPACING", "MAX_SLICE_SPACING", "SegmentationMetricsQuery",
           "hd95_clip", "patient_cases", "predicted_masks"]

DEFAULT_SLICE_SPACING = 1.0
"""Default distance between a patient's stacked slices, in in-plane pixels."""

MAX_SLICE_SPACING = 1000.0
"""Largest ``slice-spacing`` a node accepts."""


def _require_segmentation(req: QueryRequest) -> None:
    if req.plan.task != "segmentation":
        raise ConfigError(
            f"query {req.name!r} with a {req.plan.task} plan",
            safe_reason=f"malformed query: {req.name!r} serves the segmentation task, the plan "
            f"names {req.plan.task}")


def hd95_clip(plan: TrainPlan) -> float:
    """The image diagonal HD95 is clipped to, in pixels of the model's input grid."""
    dims = 3 if plan.samples == "volume-3d" else 2
    return float(plan.image_size) * math.sqrt(dims)


def slice_spacing(req: QueryRequest) -> float:
    """The coordinator's ``slice-spacing`` (in-plane pixels), checked."""
    raw = req.config.get(k.SLICE_SPACING, DEFAULT_SLICE_SPACING)
    value = float(raw) if isinstance(raw, (int, float)) and not isinstance(raw, bool) else -1.0
    if not (math.isfinite(value) and 0 < value <= MAX_SLICE_SPACING):
        raise ConfigError(
            "slice-spacing out of range",
            safe_reason=f"malformed query: 'slice-spacing' must be a number in "
            f"(0, {MAX_SLICE_SPACING:g}] (pixels)")
    return value


def predicted_masks(model: torch.nn.Module, images: torch.Tensor, device: torch.device, *,
                    batch_size: int = 32) -> np.ndarray:
    """Binary foreground (arg-max class >= 1) per sample, ``[N, *spatial]`` bool.

    The model runs in eval mode without gradients; non-finite logits are refused.
    """
    model = model.to(device)
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            logits = model(images[start:start + batch_size].to(device))
            if not bool(torch.isfinite(logits).all()):
                raise DataError("non-finite segmentation logits",
                                safe_reason="the model produced non-finite outputs")
            out.append((logits.argmax(dim=1) >= 1).cpu().numpy())
    if not out:
        return np.zeros((0, *images.shape[2:]), dtype=bool)
    return np.concatenate(out)


def _volume(masks: np.ndarray) -> np.ndarray:
    """Stack samples ``[n, *spatial]`` along the first axis into one 3-D volume."""
    return masks if masks.ndim == 3 else masks.reshape(-1, *masks.shape[-2:])


def patient_cases(pred: np.ndarray, true: np.ndarray, patient_index: np.ndarray, *,
                  spacing: tuple[float, float, float], clip: float) -> list[CaseMetrics]:
    """One :class:`CaseMetrics` per patient (sorted patient order), HD95 clipped at ``clip``.

    ``pred`` and ``true`` are binary ``[N, *spatial]`` masks; a patient's rows are stacked in
    row order.
    """
    cases = []
    for patient in np.unique(patient_index):
        rows = np.flatnonzero(patient_index == patient)
        c = case_metrics(_volume(pred[rows]), _volume(true[rows]), spacing=spacing)
        hd = min(c.hd95, clip) if math.isfinite(c.hd95) else c.hd95
        cases.append(CaseMetrics(dice=c.dice, hd95=hd, empty=c.empty))
    return cases


@register_query("segmentation-metrics")
class SegmentationMetricsQuery(Query):
    """Sums of per-patient Dice and HD95 (see the module docstring)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        _require_segmentation(req)
        slice_spacing(req)
        d = hd95_clip(req.plan)
        return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                Statistic(k.SEG_SUM_DICE, 1.0), Statistic(k.SEG_SUM_DICE_SQ, 1.0),
                Statistic(k.SEG_NUM_HD95, 1.0, integer=True),
                Statistic(k.SEG_SUM_HD95, d), Statistic(k.SEG_SUM_HD95_SQ, d * d),
                Statistic(k.SEG_EMPTY_BOTH, 1.0, small_cells=True, integer=True),
                Statistic(k.SEG_EMPTY_ONE, 1.0, small_cells=True, integer=True)]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        _require_segmentation(req)
        if not isinstance(data, HeldOutImages):
            raise ConfigError("segmentation-metrics needs held-out images")
        split = data.split
        pred = predicted_masks(load_model(req, k.ARRAYS), split.images, data.device)
        true = split.labels.cpu().numpy() >= 1
        if pred.shape != true.shape:
            raise DataError("predicted and true masks differ in shape",
                            safe_reason="the model's output grid does not match the masks")
        cases = patient_cases(pred, true, split.patient_index.reshape(-1).cpu().numpy(),
                              spacing=(slice_spacing(req), 1.0, 1.0), clip=hd95_clip(req.plan))
        s = segmentation_node_stats(cases)
        return {k.NUM_EXAMPLES: s.n, k.SEG_SUM_DICE: s.sum_dice,
                k.SEG_SUM_DICE_SQ: s.sum_dice_sq, k.SEG_NUM_HD95: s.n_hd95,
                k.SEG_SUM_HD95: s.sum_hd95, k.SEG_SUM_HD95_SQ: s.sum_hd95_sq,
                k.SEG_EMPTY_BOTH: s.n_empty_both, k.SEG_EMPTY_ONE: s.n_empty_one}
