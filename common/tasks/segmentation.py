"""Segmentation: an integer mask per sample, predicted voxel by voxel (U-Net).

The model returns ``[B, K, *spatial]`` logits for K classes (K = 2 for one lesion mask). The
per-sample loss is the voxel-mean cross-entropy plus the soft Dice loss of the foreground
classes (Milletari, Navab & Ahmadi 2016), both computed within one sample, so patients stay
independent under DP-SGD. The prediction is the class-probability map. Metrics (Dice, 95th
percentile Hausdorff distance) are computed per patient at the node from the predicted and
true masks (``common.stats.segmentation``), and only their sums leave it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from common.errors import DataError
from common.tasks.base import ModelHead, SampleKind, TargetKind, TaskInfo

__all__ = ["SEGMENTATION", "SegmentationTask"]

_EPS = 1.0  # smoothing of the soft Dice ratio (keeps an empty mask's loss finite)


@dataclass(frozen=True)
class SegmentationTask:
    """The segmentation task (see the module docstring)."""

    info: TaskInfo

    def num_outputs(self, num_classes: int) -> int:
        """Channels of the output map: one per class, background included (at least 2)."""
        return max(num_classes, 2)

    def check_targets(self, targets: torch.Tensor, num_classes: int) -> None:
        """Integer masks with classes in ``0 .. K-1``."""
        if targets.is_floating_point() or targets.ndim < 3:
            raise DataError("segmentation targets are not integer masks",
                            safe_reason="the node's masks are not integer masks")
        classes = max(num_classes, 2)
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise DataError(f"mask values fall outside 0..{classes - 1}",
                            safe_reason="the node's masks hold classes the task does not have")

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Voxel-mean cross-entropy + soft Dice loss of the foreground, per sample."""
        targets = targets.long()
        ce = F.cross_entropy(outputs, targets, reduction="none").flatten(1).mean(1)
        probs = torch.softmax(outputs, dim=1).flatten(2)[:, 1:]
        onehot = F.one_hot(targets, outputs.shape[1]).movedim(-1, 1).flatten(2)[:, 1:]
        onehot = onehot.to(probs.dtype)
        overlap = (probs * onehot).sum(2)
        total = probs.sum(2) + onehot.sum(2)
        dice = ((2 * overlap + _EPS) / (total + _EPS)).mean(1)
        return ce + (1 - dice)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities per voxel, ``[B, K, *spatial]``."""
        return torch.softmax(outputs, dim=1)

    def patient_prediction(self, predictions: np.ndarray, targets: np.ndarray,
                           patient_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Predicted and true masks, images ordered by patient (metrics are per patient)."""
        order = np.argsort(patient_index, kind="stable")
        masks = predictions.argmax(axis=1) if predictions.ndim == targets.ndim + 1 else predictions
        return masks[order], targets[order]


SEGMENTATION = SegmentationTask(TaskInfo(
    "segmentation", TargetKind.MASK, ModelHead.SEGMENTATION,
    (SampleKind.IMAGE_2D, SampleKind.VOLUME_3D),
    "a mask per image or volume (e.g. lung tumour): per-patient Dice and HD95"))
