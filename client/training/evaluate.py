"""Evaluation of a classifier on held-out images, per image or per patient.

Binary tasks only for AUC and accuracy: the score of an image is the softmax probability of
class 1. With a ``patient_index`` the metrics are computed per patient (the unit of privacy and
of clinical decision): a patient's score is the mean of its images' scores and its label is the
maximum of its images' labels (a patient is positive if any image is).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.nn import functional as F

from client.training.trainer import select_device
from common.errors import ConfigError

__all__ = ["EvalResult", "evaluate"]

logger = logging.getLogger(__name__)

THRESHOLD = 0.5
"""Score threshold for accuracy."""


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation.

    Attributes
    ----------
    loss : float
        Mean cross-entropy over images (not patients).
    accuracy : float
        Fraction of units (images or patients) with ``(score >= 0.5) == label``.
    auc : float
        ROC AUC over units; ``nan`` when only one class is present (AUC is undefined).
    num_examples : int
        Units evaluated: images, or patients when a ``patient_index`` was given.
    scores : numpy.ndarray
        Per-unit score (probability of class 1), float64, shape ``(num_examples,)``.
    labels : numpy.ndarray
        Per-unit label, int64, shape ``(num_examples,)``.
    """

    loss: float
    accuracy: float
    auc: float
    num_examples: int
    scores: np.ndarray
    labels: np.ndarray


def _image_scores(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int
) -> tuple[float, np.ndarray]:
    """Return (mean image cross-entropy, class-1 probabilities)."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    scores: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].to(device)
                logits = model(x)
                if logits.ndim != 2:
                    raise ConfigError(
                        f"evaluate scores classifiers ([B, 2] logits); this model returns "
                        f"shape {tuple(logits.shape)} (a segmentation model is scored with "
                        "Dice, see common.models.unet)"
                    )
                if logits.shape[1] != 2:
                    raise ConfigError(
                        f"evaluate supports binary classifiers (2 logits), got {logits.shape[1]}"
                    )
                loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
                scores.append(torch.softmax(logits, dim=1)[:, 1].cpu())
    finally:
        model.train(was_training)
    return loss_sum / len(images), torch.cat(scores).double().numpy()


def _per_patient(
    scores: np.ndarray, labels: np.ndarray, patient_index: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Aggregate image scores/labels to patients: mean score, max label; sorted patient ids."""
    _, inverse = np.unique(patient_index, return_inverse=True)
    n = int(inverse.max()) + 1
    counts = np.bincount(inverse, minlength=n)
    p_scores = np.bincount(inverse, weights=scores, minlength=n) / counts
    p_labels = np.zeros(n, dtype=np.int64)
    np.maximum.at(p_labels, inverse, labels)
    return p_scores, p_labels


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patient_index: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
) -> EvalResult:
    """Evaluate a binary classifier on images, optionally aggregated per patient.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning ``[B, 2]`` logits; left in its original train/eval mode.
    images : torch.Tensor
        ``[N, C, ...]`` images.
    labels : torch.Tensor
        ``[N]`` (or ``[N, 1]``) integer labels in {0, 1}.
    patient_index : torch.Tensor, optional
        ``[N]`` patient id of each image; metrics are then per patient.
    device : str or torch.device, optional
        Where to run the model; default :func:`~client.training.trainer.select_device`. The
        model is moved there.
    batch_size : int, optional
        Images per forward pass.

    Returns
    -------
    EvalResult
        Loss (per image), accuracy and AUC (per unit), units, scores and labels.

    Raises
    ------
    ConfigError
        For empty or mismatched inputs, or a non-binary model.
    """
    labels = labels.reshape(-1).long()
    if len(images) == 0:
        raise ConfigError("nothing to evaluate: no images")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    dev = device if isinstance(device, torch.device) else select_device(device)
    model.to(dev)
    loss, scores = _image_scores(model, images, labels, dev, batch_size)
    unit_labels = labels.cpu().numpy().astype(np.int64)
    if patient_index is not None:
        index = patient_index.reshape(-1).cpu().numpy()
        if len(index) != len(labels):
            raise ConfigError(f"patient_index has {len(index)} entries for {len(labels)} images")
        scores, unit_labels = _per_patient(scores, unit_labels, index)
    accuracy = float(np.mean((scores >= THRESHOLD).astype(np.int64) == unit_labels))
    if len(np.unique(unit_labels)) < 2:
        logger.info("only one class present: AUC is undefined (nan)")
        auc = math.nan
    else:
        auc = float(roc_auc_score(unit_labels, scores))
    return EvalResult(
        loss=loss,
        accuracy=accuracy,
        auc=auc,
        num_examples=len(unit_labels),
        scores=scores,
        labels=unit_labels,
    )
