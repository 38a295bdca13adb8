"""Evaluation of a classifier on held-out images, per image or per patient, through its task.

The task (:mod:`common.tasks`; binary by default) gives each image's prediction
(:meth:`~common.tasks.Task.predict`), its loss (:meth:`~common.tasks.Task.per_sample_loss`)
and the per-patient aggregation (:meth:`~common.tasks.Task.patient_prediction`: the mean of
a patient's image predictions, the maximum of its labels). With a ``patient_index`` the
metrics are per patient (the unit of privacy and of clinical decision).

* ``binary``: the score of a unit is P(class 1); accuracy at ``score >= 0.5``; the AUC of
  the scores (``sklearn.metrics.roc_auc_score``).
* ``multiclass``: the scores of a unit are its K class probabilities; accuracy of the
  arg-max class (no threshold); the macro one-vs-rest AUC (``roc_auc_score(...,
  multi_class="ovr", average="macro")``), undefined (NaN) unless every class is present.

The other tasks have no accuracy or AUC here (NaN); their per-round metric is the loss, and
:attr:`EvalResult.extra` carries one task metric (their pooled inference with intervals is
the coordinator's, from statistics queries):

* ``ordinal``: the grade is the number of thresholds whose mean P(grade > k) is at least
  0.5; ``accuracy`` is exact-grade agreement and ``extra[k.EVAL_MAE_GRADE]`` the mean absolute
  grade error;
* ``multilabel``: ``auc`` is the macro AUC over findings (NaN unless every finding has
  positives and negatives), ``accuracy`` the fraction of correct finding decisions at 0.5;
* ``regression``: ``extra[k.EVAL_MAE]``, the mean absolute error per unit;
* ``segmentation``: ``extra[k.EVAL_DICE]``, the mean per-patient Dice of the foreground (every
  slice of a patient together);
* ``reconstruction``: the loss alone (the voxel-mean reconstruction error).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from client.training.trainer import select_device
from common import messages as k
from common.errors import ConfigError
from common.tasks import BINARY, Task
from common.tasks.base import TargetKind

__all__ = ["EvalResult", "evaluate"]

logger = logging.getLogger(__name__)

THRESHOLD = 0.5
"""Score threshold for accuracy (binary task)."""

SCORED_TASKS = ("binary", "multiclass")
"""Tasks :func:`evaluate` scores (accuracy and AUC)."""


@dataclass(frozen=True)
class EvalResult:
    """Metrics of one evaluation.

    Attributes
    ----------
    loss : float
        Mean per-sample loss of the task (cross-entropy) over images (not patients).
    accuracy : float
        Fraction of units (images or patients) classified correctly: ``(score >= 0.5) ==
        label`` (binary), arg-max class ``== label`` (multi-class).
    auc : float
        ROC AUC over units (binary), macro one-vs-rest AUC (multi-class); ``nan`` when a
        class is absent (AUC is undefined).
    num_examples : int
        Units evaluated: images, or patients when a ``patient_index`` was given.
    scores : numpy.ndarray
        Per-unit prediction, float64: shape ``(num_examples,)``, the probability of class 1
        (binary), or ``(num_examples, K)`` class probabilities (multi-class).
    labels : numpy.ndarray
        Per-unit label, int64, shape ``(num_examples,)``.
    extra : dict[str, float]
        One task metric of the tasks without accuracy or AUC (see the module docstring).
    task : str
        The task evaluated.
    """

    loss: float
    accuracy: float
    auc: float
    num_examples: int
    scores: np.ndarray
    labels: np.ndarray
    extra: dict[str, float] = field(default_factory=dict)
    task: str = "binary"

    @property
    def binary_scores(self) -> bool:
        """Whether ``scores`` are one P(class 1) per unit (binary histograms apply)."""
        return self.task == "binary"


def _image_predictions(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, device: torch.device,
    batch_size: int, task: Task, outputs: int,
) -> tuple[float, np.ndarray]:
    """Return (mean image loss, per-image predictions of the task)."""
    was_training = model.training
    model.eval()
    loss_sum = 0.0
    preds: list[torch.Tensor] = []
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                x = images[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].to(device)
                if task.info.target is TargetKind.SELF:  # reconstruction: the loss alone
                    losses = task.model_loss(model, x)  # type: ignore[attr-defined]
                    loss_sum += float(losses.sum())
                    preds.append(losses.detach().cpu())
                    continue
                logits = model(x)
                if task.info.target is TargetKind.MASK:
                    loss_sum += float(task.per_sample_loss(logits, y).sum())
                    preds.append(logits.argmax(dim=1).cpu())
                    continue
                if logits.ndim != 2:
                    raise ConfigError(
                        f"evaluate scores classifiers ([B, {outputs}] logits); this model "
                        f"returns shape {tuple(logits.shape)} (a segmentation model is scored "
                        "with Dice, see common.models.unet)"
                    )
                if logits.shape[1] != outputs:
                    raise ConfigError(
                        f"the {task.info.name} task needs {outputs} logits, got {logits.shape[1]}"
                    )
                loss_sum += float(task.per_sample_loss(logits, y).sum())
                preds.append(task.predict(logits).cpu())
    finally:
        model.train(was_training)
    return loss_sum / len(images), torch.cat(preds).double().numpy()


def _accuracy_auc(task: Task, scores: np.ndarray, labels: np.ndarray,
                  num_classes: int) -> tuple[float, float]:
    """Accuracy and AUC of per-unit scores (see the module docstring)."""
    if task.info.name == "binary":
        accuracy = float(np.mean((scores >= THRESHOLD).astype(np.int64) == labels))
        if len(np.unique(labels)) < 2:
            logger.info("only one class present: AUC is undefined (nan)")
            return accuracy, math.nan
        return accuracy, float(roc_auc_score(labels, scores))
    accuracy = float(np.mean(scores.argmax(axis=1) == labels))
    if len(np.unique(labels)) < num_classes:
        logger.info("a class is absent: the macro one-vs-rest AUC is undefined (nan)")
        return accuracy, math.nan
    if num_classes == 2:  # sklearn scores two classes as binary; both one-vs-rest AUCs agree
        return accuracy, float(roc_auc_score(labels, scores[:, 1]))
    auc = roc_auc_score(labels, scores, multi_class="ovr", average="macro",
                        labels=list(range(num_classes)))
    return accuracy, float(auc)


def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    patient_index: torch.Tensor | None = None,
    device: str | torch.device | None = None,
    batch_size: int = 256,
    task: Task | None = None,
    num_classes: int = 2,
) -> EvalResult:
    """Evaluate a classifier on images, optionally aggregated per patient.

    Parameters
    ----------
    model : torch.nn.Module
        Classifier returning ``[B, task.num_outputs(num_classes)]`` logits; left in its
        original train/eval mode.
    images : torch.Tensor
        ``[N, C, ...]`` images.
    labels : torch.Tensor
        ``[N]`` (or ``[N, 1]``) integer labels in ``0 .. num_classes - 1``.
    patient_index : torch.Tensor, optional
        ``[N]`` patient id of each image; metrics are then per patient.
    device : str or torch.device, optional
        Where to run the model; default :func:`~client.training.trainer.select_device`. The
        model is moved there.
    batch_size : int, optional
        Images per forward pass.
    task : common.tasks.Task, optional
        The learning task (default binary); ``binary`` or ``multiclass``.
    num_classes : int, optional
        Classes of the task (2 for binary).

    Returns
    -------
    EvalResult
        Loss (per image), accuracy and AUC (per unit), units, scores and labels.

    Raises
    ------
    ConfigError
        For empty or mismatched inputs, a task it does not score, or a model whose outputs
        do not fit the task.
    """
    task = BINARY if task is None else task
    if task.info.name in SCORED_TASKS:
        labels = labels.reshape(-1).long()
    if len(images) == 0:
        raise ConfigError("nothing to evaluate: no images")
    if len(images) != len(labels):
        raise ConfigError(f"{len(images)} images but {len(labels)} labels")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    outputs = task.num_outputs(num_classes)
    dev = device if isinstance(device, torch.device) else select_device(device)
    model.to(dev)
    loss, scores = _image_predictions(model, images, labels, dev, batch_size, task, outputs)
    if task.info.name not in SCORED_TASKS:
        return _task_result(task, loss, scores, labels, patient_index)
    unit_labels = labels.cpu().numpy().astype(np.int64)
    if patient_index is not None:
        index = patient_index.reshape(-1).cpu().numpy()
        if len(index) != len(labels):
            raise ConfigError(f"patient_index has {len(index)} entries for {len(labels)} images")
        scores, unit_labels = task.patient_prediction(scores, unit_labels, index)
        unit_labels = unit_labels.astype(np.int64)
    accuracy, auc = _accuracy_auc(task, scores, unit_labels, num_classes)
    return EvalResult(
        loss=loss,
        accuracy=accuracy,
        auc=auc,
        num_examples=len(unit_labels),
        scores=scores,
        labels=unit_labels,
        task=task.info.name,
    )


def _dice_per_patient(masks: np.ndarray, truth: np.ndarray, patients: np.ndarray) -> np.ndarray:
    """Foreground Dice per patient over all its slices (1 when both masks are empty)."""
    out = []
    for pid in np.unique(patients):
        pred = masks[patients == pid] > 0
        true = truth[patients == pid] > 0
        total = int(pred.sum()) + int(true.sum())
        out.append(1.0 if total == 0 else 2.0 * float((pred & true).sum()) / total)
    return np.asarray(out)


def _task_result(task: Task, loss: float, scores: np.ndarray, labels: torch.Tensor,
                 patient_index: torch.Tensor | None) -> EvalResult:
    """Metrics of the tasks :func:`evaluate` does not score by accuracy and AUC alone."""
    name, target = task.info.name, task.info.target
    truth = labels.cpu().numpy()
    index = (np.arange(len(truth)) if patient_index is None
             else patient_index.reshape(-1).cpu().numpy())
    accuracy = auc = math.nan
    extra: dict[str, float] = {}
    if target is TargetKind.MASK:
        dice = _dice_per_patient(scores, truth, index)
        extra[k.EVAL_DICE] = float(dice.mean())
        return EvalResult(loss, accuracy, auc, len(dice), dice, np.zeros(len(dice), np.int64),
                          extra, name)
    if target is TargetKind.SELF:
        units = np.unique(index).size
        per_unit = np.asarray([scores[index == pid].mean() for pid in np.unique(index)])
        return EvalResult(loss, accuracy, auc, units, per_unit, np.zeros(units, np.int64),
                          extra, name)
    unit_scores, unit_labels = task.patient_prediction(scores, truth, index)
    if target is TargetKind.GRADE:
        grades = (unit_scores >= THRESHOLD).sum(axis=1)
        accuracy = float(np.mean(grades == unit_labels))
        extra[k.EVAL_MAE_GRADE] = float(np.mean(np.abs(grades - unit_labels)))
    elif target is TargetKind.CLASSES:
        accuracy = float(np.mean((unit_scores >= THRESHOLD) == (unit_labels > 0)))
        present = [j for j in range(unit_labels.shape[1]) if len(np.unique(unit_labels[:, j])) == 2]
        if len(present) == unit_labels.shape[1]:
            auc = float(roc_auc_score(unit_labels, unit_scores, average="macro"))
    elif target is TargetKind.VALUE:
        extra[k.EVAL_MAE] = float(np.mean(np.abs(unit_scores - unit_labels)))
    return EvalResult(loss, accuracy, auc, len(unit_labels), unit_scores, unit_labels, extra,
                      name)
