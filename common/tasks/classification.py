"""Classification tasks: binary, multi-class, ordinal and multi-label.

Each is a frozen dataclass implementing :class:`common.tasks.base.Task`; all share the
classification head (a ``[B, outputs]`` vector per sample) and per-sample losses from
``torch.nn.functional`` with ``reduction="none"``.

- ``binary``: two logits, softmax cross-entropy; the prediction is P(class 1). The project's
  original path: :func:`client.training.evaluate.evaluate` and the pooled binary inference.
- ``multiclass``: K logits, softmax cross-entropy; the prediction is the K-vector of class
  probabilities.
- ``ordinal``: K-1 cumulative logits, one per threshold "grade > k", each with a binary
  cross-entropy (a cumulative-link model in the spirit of CORAL, Cao, Mirjalili & Raschka
  2020, without its weight sharing); the prediction is the K-1 vector P(grade > k), whose sum
  is the expected grade. Orders the grades, unlike multi-class cross-entropy.
- ``multilabel``: K logits, one binary cross-entropy per finding, summed per sample; the
  prediction is the K-vector of finding probabilities.

A patient's prediction is the mean over its images; its target is the maximum over its images
(a patient is positive for a class, grade or finding if any image is), as the binary path has
always done.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from common.errors import DataError
from common.tasks.base import (
    ModelHead,
    SampleKind,
    TargetKind,
    TaskInfo,
    max_by_patient,
    mean_by_patient,
)

__all__ = ["BINARY", "MULTICLASS", "MULTILABEL", "ORDINAL", "ClassificationTask"]

_SAMPLES = (SampleKind.IMAGE_2D, SampleKind.VOLUME_3D, SampleKind.SERIES)


def _bad_targets(task: str, what: str) -> DataError:
    return DataError(f"{task} targets {what}",
                     safe_reason=f"the node's labels do not fit the {task} task ({what})")


@dataclass(frozen=True)
class ClassificationTask:
    """One of the four classification tasks (see the module docstring)."""

    info: TaskInfo

    @property
    def _kind(self) -> str:
        return self.info.name

    def num_outputs(self, num_classes: int) -> int:
        """Logits per sample: 2 (binary), K (multi-class, multi-label) or K-1 (ordinal)."""
        if self._kind == "binary":
            return 2
        if num_classes < 2:
            raise DataError(f"{self._kind} needs at least 2 classes, got {num_classes}",
                            safe_reason=f"the {self._kind} task needs at least 2 classes")
        return num_classes - 1 if self._kind == "ordinal" else num_classes

    def check_targets(self, targets: torch.Tensor, num_classes: int) -> None:
        """Integer classes in range (multi-hot 0/1 vectors of width K for multi-label)."""
        classes = 2 if self._kind == "binary" else num_classes
        if targets.is_floating_point() or targets.dtype == torch.bool:
            raise _bad_targets(self._kind, "are not integers")
        if self._kind == "multilabel":
            if targets.ndim != 2 or targets.shape[1] != classes:
                raise _bad_targets(self._kind, f"are not {classes}-wide 0/1 vectors")
            if ((targets != 0) & (targets != 1)).any():
                raise _bad_targets(self._kind, "hold values other than 0 and 1")
            return
        if targets.ndim != 1:
            raise _bad_targets(self._kind, "are not one class per sample")
        if len(targets) and (int(targets.min()) < 0 or int(targets.max()) >= classes):
            raise _bad_targets(self._kind, f"fall outside 0..{classes - 1}")

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """``[B]`` losses; row ``i`` uses only row ``i``."""
        if self._kind in ("binary", "multiclass"):
            return F.cross_entropy(outputs, targets.long(), reduction="none")
        if self._kind == "ordinal":
            thresholds = torch.arange(outputs.shape[1], device=outputs.device)
            above = (targets.long().unsqueeze(1) > thresholds).to(outputs.dtype)
            return F.binary_cross_entropy_with_logits(outputs, above, reduction="none").sum(1)
        return F.binary_cross_entropy_with_logits(
            outputs, targets.to(outputs.dtype), reduction="none").sum(1)

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """P(class 1) (binary); class probabilities; P(grade > k); finding probabilities."""
        if self._kind == "binary":
            return torch.softmax(outputs, dim=1)[:, 1]
        if self._kind == "multiclass":
            return torch.softmax(outputs, dim=1)
        return torch.sigmoid(outputs)

    def patient_prediction(self, predictions: np.ndarray, targets: np.ndarray,
                           patient_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean prediction and maximum target per patient (patients in sorted order)."""
        return (mean_by_patient(predictions, patient_index),
                max_by_patient(targets, patient_index))


BINARY = ClassificationTask(TaskInfo(
    "binary", TargetKind.CLASS, ModelHead.CLASSIFICATION, _SAMPLES,
    "two classes (disease or not): pooled AUC, sensitivity and specificity at an operating point"))
MULTICLASS = ClassificationTask(TaskInfo(
    "multiclass", TargetKind.CLASS, ModelHead.CLASSIFICATION, _SAMPLES,
    "one of K classes (e.g. tumour type): macro and per-class AUC, confusion matrix"))
ORDINAL = ClassificationTask(TaskInfo(
    "ordinal", TargetKind.GRADE, ModelHead.CLASSIFICATION, _SAMPLES,
    "an ordered grade 0..K-1 (e.g. retinopathy grade): quadratic-weighted kappa"))
MULTILABEL = ClassificationTask(TaskInfo(
    "multilabel", TargetKind.CLASSES, ModelHead.CLASSIFICATION, _SAMPLES,
    "several findings per image: per-finding AUC with Holm correction"))
