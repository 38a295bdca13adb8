"""The node's semi-supervised training step (:mod:`common.paradigms.semi_supervised`).

:func:`semi_supervised_training` builds one record per training patient, labelled or not:
the split's patients (labels hidden for all but ``labelled-fraction`` of them,
:func:`labelled_mask`) and the node's unlabelled training patients
(:func:`client.data.task_data.load_unlabelled`). A record is ``(views, target)``: two
augmented views ``[2, C, *spatial]`` of one image of the patient (drawn at random, as
:class:`client.data.node_data.PatientRecordDataset` does) and its target: the class of a
labelled patient's image, the accepted pseudo-label of an unlabelled image, or ``-1``
(none). :func:`semi_supervised_loss` is the per-sample loss of one record.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from client.data.augment import Transform, augment_transform, augment_view
from client.data.node_data import NodeData, PerPatientDataset, SplitArrays
from client.paradigms import NodeTraining
from common.config import TrainPlan
from common.errors import ConfigError
from common.paradigms.semi_supervised import TASKS
from common.tasks.base import Task

__all__ = ["SemiSupervisedDataset", "labelled_mask", "pseudo_labels", "semi_supervised_loss",
           "semi_supervised_training"]

log = logging.getLogger(__name__)

#: Target of a record without a label (no cross-entropy term).
NO_LABEL = -1
_BATCH = 256


def _rank(patient: int, label: int) -> bytes:
    """A fixed pseudo-random order of the patients of one class (node-local, no plan seed)."""
    return hashlib.sha256(f"vesalius-labelled\x1f{label}\x1f{patient}".encode()).digest()


def patient_labels(split: SplitArrays) -> list[int]:
    """The class of each patient of ``split``: that of its first image."""
    first: dict[int, int] = {}
    for owner, label in zip(split.patient_index.tolist(), split.labels.tolist(), strict=True):
        first.setdefault(int(owner), int(label))
    return [first[p] for p in range(split.num_patients)]


def labelled_mask(labels: list[int], fraction: float) -> torch.Tensor:
    """Which patients keep their label under ``labelled-fraction``: bool ``[len(labels)]``.

    Stratified: of each class's ``n`` patients, ``max(1, round(fraction * n))`` keep theirs,
    chosen by a fixed hash of (class, patient index), so the choice is deterministic and
    made at the node (the coordinator never learns which). ``fraction >= 1`` keeps all.
    """
    keep = torch.ones(len(labels), dtype=torch.bool)
    if fraction >= 1.0:
        return keep
    keep[:] = False
    for label in sorted(set(labels)):
        members = sorted((p for p, c in enumerate(labels) if c == label),
                         key=lambda p: _rank(p, label))
        count = max(1, round(fraction * len(members)))
        keep[members[:count]] = True
    return keep


@torch.no_grad()
def pseudo_labels(model: nn.Module, images: torch.Tensor, threshold: float) -> torch.Tensor:
    """The model's class of each image where its probability reaches ``threshold``, else -1."""
    out = torch.full((images.shape[0],), NO_LABEL, dtype=torch.int64)
    if images.shape[0] == 0:
        return out
    was_training = model.training
    model.eval()
    try:
        for start in range(0, images.shape[0], _BATCH):
            probs = torch.softmax(model(images[start:start + _BATCH]).float(), dim=1)
            confidence, label = probs.max(dim=1)
            out[start:start + _BATCH] = torch.where(confidence >= threshold, label,
                                                    torch.full_like(label, NO_LABEL))
    finally:
        model.train(was_training)
    return out


class SemiSupervisedDataset(PerPatientDataset):
    """One record per patient, labelled or not: ``(views [2, C, *spatial], target)``.

    Parameters
    ----------
    images : torch.Tensor
        Every image ``[N, C, *spatial]`` of every patient.
    targets : torch.Tensor
        int64 ``[N]``: the image's class, pseudo-label, or -1.
    patient_index : torch.Tensor
        int64 ``[N]``: its patient.
    num_patients : int
        Patients (records).
    strong, light : callable or None
        The transforms of the first view (trained on) and of the second (the consistency
        target); None keeps the image as it is.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, patient_index: torch.Tensor,
                 num_patients: int, *, strong: Transform | None,
                 light: Transform | None) -> None:
        super().__init__(patient_index, num_patients)
        self.images, self.targets = images, targets
        self.strong, self.light = strong, light

    def _item(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[pick]
        views = [image if t is None else augment_view(t, image)[0]
                 for t in (self.strong, self.light)]
        return torch.stack(views), self.targets[pick]


def semi_supervised_loss(method: str, consistency_weight: float) -> Any:
    """The ``input_loss`` of :func:`client.training.train_dp`: per-record losses ``[B]``.

    Cross-entropy on the first view where the record has a target (label or accepted
    pseudo-label) unless ``method`` is ``consistency`` without pseudo-labels (targets are
    then the labels only); with consistency, ``consistency_weight`` times
    KL(p(second view) || p(first view)), the second view's prediction held fixed (computed
    without a gradient: no per-sample gradient hook sees it). Row ``i`` of the result depends
    on record ``i`` only (the models are GroupNorm, no batch statistics).
    """
    consistency = method in ("consistency", "both")

    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = model(inputs[:, 0])
        has = targets >= 0
        ce = F.cross_entropy(logits, targets.clamp(min=0), reduction="none") * has
        if not consistency:
            return ce
        with torch.no_grad():
            target_probs = torch.softmax(model(inputs[:, 1]), dim=1)
        kl = F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="none").sum(dim=1)
        return ce + consistency_weight * kl

    return loss


def _unlabelled(plan: TrainPlan, data: NodeData, like: SplitArrays) -> SplitArrays:
    """The node's unlabelled training patients (none without a data folder).

    The same patients in cross-validation, in every fold: they have no label, so no fold
    holds them out (the folds deal out the labelled patients only,
    :func:`client.data.folds.cv_splits`)."""
    from client.data.task_data import load_unlabelled

    if not data.root:
        return SplitArrays(images=like.images[:0], labels=like.labels[:0],
                           patient_index=like.patient_index[:0], num_patients=0)
    return load_unlabelled(data.root, task=plan.task, num_classes=plan.num_classes,
                           samples=plan.samples, image_size=plan.image_size,
                           require_deidentified=data.report.require_deidentified)


def semi_supervised_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                             model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """The semi-supervised training step (see the module docstring).

    Raises
    ------
    ConfigError
        A task other than binary or multi-class.
    """
    from common.tasks.federated import prepare_for_training

    if task.info.name not in TASKS:
        raise ConfigError(f"semi-supervised training serves {' and '.join(TASKS)}, not "
                          f"{task.info.name}", safe_reason="refused: semi-supervised "
                          "training serves binary and multiclass tasks only")
    method = str(options["method"])
    keep = labelled_mask(patient_labels(split), float(options["labelled-fraction"]))
    extra = _unlabelled(plan, data, split)
    images = torch.cat([split.images, extra.images])
    owners = torch.cat([split.patient_index, extra.patient_index + split.num_patients])
    labelled_image = torch.cat([keep[split.patient_index],
                                torch.zeros(len(extra), dtype=torch.bool)])
    targets = torch.where(labelled_image, torch.cat([split.labels, extra.labels]).long(),
                          torch.full((len(images),), NO_LABEL, dtype=torch.int64))
    if method in ("pseudo-label", "both"):
        guessed = pseudo_labels(model, images[~labelled_image], float(options["threshold"]))
        targets[~labelled_image] = guessed
        log.info("semi-supervised: %d of %d unlabelled images pseudo-labelled (kept at the "
                 "node)", int((guessed >= 0).sum()), int(guessed.numel()))
    num_patients = split.num_patients + extra.num_patients
    log.info("semi-supervised: %d training patients, %d labelled (kept at the node)",
             num_patients, int(keep.sum()))
    consistency = method in ("consistency", "both")
    level = "strong" if consistency else plan.augment
    dataset = SemiSupervisedDataset(
        images, targets, owners, num_patients,
        strong=augment_transform(level, plan.task, plan.samples),
        light=augment_transform("light", plan.task, plan.samples) if consistency else None)
    loss = semi_supervised_loss(method, float(options["consistency-weight"]))
    return NodeTraining(model=prepare_for_training(task, model), dataset=dataset,
                        num_patients=num_patients, losses={"input_loss": loss})
