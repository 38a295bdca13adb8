"""Regression: one real-valued target per sample (a lesion volume, a severity score).

One output per sample and the squared error as its per-sample loss. Targets are used as they
come: a node whose target spans orders of magnitude should log-transform it before labelling
(the loss, the clipping bound and the learning rate all see its scale). A patient's prediction
and target are the means over its images.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from common.errors import DataError
from common.tasks.base import ModelHead, SampleKind, TargetKind, TaskInfo, mean_by_patient

__all__ = ["REGRESSION", "RegressionTask"]


@dataclass(frozen=True)
class RegressionTask:
    """The regression task (see the module docstring)."""

    info: TaskInfo

    def num_outputs(self, num_classes: int) -> int:
        """One value per sample, whatever ``num_classes`` says."""
        return 1

    def check_targets(self, targets: torch.Tensor, num_classes: int) -> None:
        """Finite real numbers, one per sample."""
        if targets.ndim != 1:
            raise DataError("regression targets are not one value per sample",
                            safe_reason="the node's targets are not one value per sample")
        if not bool(torch.isfinite(targets.double()).all()):
            raise DataError("regression targets hold NaN or infinite values",
                            safe_reason="the node's regression targets are not all finite")

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Squared error per sample."""
        return (outputs.reshape(len(outputs), -1)[:, 0] - targets.to(outputs.dtype)) ** 2

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """The predicted value per sample."""
        return outputs.reshape(len(outputs), -1)[:, 0]

    def patient_prediction(self, predictions: np.ndarray, targets: np.ndarray,
                           patient_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean prediction and mean target per patient."""
        return (mean_by_patient(predictions, patient_index),
                mean_by_patient(targets.astype(np.float64), patient_index))


REGRESSION = RegressionTask(TaskInfo(
    "regression", TargetKind.VALUE, ModelHead.CLASSIFICATION,
    (SampleKind.IMAGE_2D, SampleKind.VOLUME_3D, SampleKind.SERIES),
    "a real number per image or volume (e.g. lesion volume): MAE, RMSE, R², Bland-Altman"))
