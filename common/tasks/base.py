"""What a learning task is: its samples, its targets, its per-sample loss and its predictions.

A task is the contract between the data a node holds and the model it trains. Every task
module defines one :class:`Task` (a small frozen dataclass implementing the methods below)
and registers it (:mod:`common.tasks.registry`). The node, the trainer, the evaluation and the
coordinator's inference then dispatch on the task instead of branching on its name.

Privacy: the loss of a task is **per sample** (:meth:`Task.per_sample_loss` returns one value
per row of the batch and no row's value depends on another row), which is what DP-SGD's
per-sample clipping needs; a batch statistic (batch normalisation, a batch-mean target) would
couple patients and break the guarantee. The contract tests check this on every registered
(task, model) pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["ModelHead", "SampleKind", "TargetKind", "Task", "TaskInfo"]


class SampleKind(str, Enum):
    """What one sample (one row of a batch) is."""

    IMAGE_2D = "image-2d"
    """A ``[C, H, W]`` image."""
    VOLUME_3D = "volume-3d"
    """A ``[C, D, H, W]`` volume (a series assembled along its slice normal)."""
    SERIES = "series"
    """A series read as a sequence of 2D slices (recurrent models)."""


class TargetKind(str, Enum):
    """What a task's target is, per sample."""

    CLASS = "class"
    """One integer class in ``0 .. K-1``."""
    GRADE = "grade"
    """One ordered integer grade in ``0 .. K-1``."""
    CLASSES = "classes"
    """A multi-hot vector of K findings."""
    VALUE = "value"
    """One real number."""
    MASK = "mask"
    """An integer mask of the sample's shape (0 = background)."""
    SELF = "self"
    """The sample itself (self-supervised reconstruction: no label needed)."""


class ModelHead(str, Enum):
    """What a model must output for a task (matched against ``ModelSpec.tasks``)."""

    CLASSIFICATION = "classification"
    """A ``[B, outputs]`` vector per sample."""
    SEGMENTATION = "segmentation"
    """A ``[B, outputs, *spatial]`` map per sample."""
    RECONSTRUCTION = "reconstruction"
    """A model that reconstructs its input: its own per-sample objective
    ``reconstruction_loss_per_sample(inputs) -> [B]`` and the modules it trains
    (``reconstruction_modules()``), or at least ``reconstruct``."""


@dataclass(frozen=True)
class TaskInfo:
    """The static description of a task (what ``vesalius models list`` and errors show).

    Attributes
    ----------
    name : str
        The registry name (``binary``, ``multiclass``, ...).
    target : TargetKind
        The target's kind.
    head : ModelHead
        What a model must output.
    samples : tuple[SampleKind, ...]
        The sample kinds the task accepts (a model must also support their dimensionality).
    summary : str
        One sentence for people.
    """

    name: str
    target: TargetKind
    head: ModelHead
    samples: tuple[SampleKind, ...]
    summary: str


@runtime_checkable
class Task(Protocol):
    """A learning task. Implementations are frozen dataclasses registered by name."""

    info: TaskInfo

    def num_outputs(self, num_classes: int) -> int:
        """Outputs per sample (per voxel for segmentation) for ``num_classes`` classes/findings."""
        ...

    def check_targets(self, targets: torch.Tensor, num_classes: int) -> None:
        """Raise :class:`~common.errors.DataError` (safe reason, no value) on invalid targets."""
        ...

    def per_sample_loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """A ``[B]`` loss, row ``i`` depending only on row ``i`` of ``outputs``/``targets``."""
        ...

    def predict(self, outputs: torch.Tensor) -> torch.Tensor:
        """Predictions from outputs: probabilities, expected grade, values or a mask."""
        ...

    def patient_prediction(self, predictions: np.ndarray, targets: np.ndarray,
                           patient_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Aggregate image-level predictions and targets to one per patient (the unit of
        privacy and of clinical decision)."""
        ...


def group_rows(patient_index: np.ndarray) -> tuple[np.ndarray, int]:
    """``(inverse, n)``: each row's patient position (in sorted patient order) and the count."""
    _, inverse = np.unique(patient_index, return_inverse=True)
    return inverse, int(inverse.max()) + 1 if len(inverse) else 0


def mean_by_patient(values: np.ndarray, patient_index: np.ndarray) -> np.ndarray:
    """Per-patient mean of ``values`` (rows along axis 0), patients in sorted order."""
    inverse, n = group_rows(patient_index)
    flat = values.reshape(len(values), -1).astype(np.float64)
    sums = np.zeros((n, flat.shape[1]))
    np.add.at(sums, inverse, flat)
    counts = np.bincount(inverse, minlength=n).reshape(-1, 1)
    return (sums / counts).reshape((n, *values.shape[1:]))


def max_by_patient(values: np.ndarray, patient_index: np.ndarray) -> np.ndarray:
    """Per-patient maximum of integer ``values`` (rows along axis 0), patients in sorted order."""
    inverse, n = group_rows(patient_index)
    flat = values.reshape(len(values), -1)
    out = np.full((n, flat.shape[1]), np.iinfo(np.int64).min, dtype=np.int64)
    np.maximum.at(out, inverse, flat.astype(np.int64))
    return out.reshape((n, *values.shape[1:]))

