"""The node's training step under ``--paradigm multi-task`` (see :mod:`common.paradigms.multi_task`).

The dataset is the segmentation task's: one record per patient, one of the patient's
image/mask pairs (:class:`client.data.node_data.PatientRecordDataset`, augmented as the plan
says). The loss of a record is the weighted sum of the two heads' per-sample losses of that
record (:func:`multi_task_loss`); the presence target is derived from the record's own mask
(:func:`presence_targets`), so it needs no label file and couples no two patients.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from client.data.node_data import NodeData, SplitArrays
from client.paradigms import NodeTraining
from common.config import TrainPlan
from common.errors import ConfigError
from common.models.multi_task import presence_targets
from common.tasks.base import Task

__all__ = ["multi_task_loss", "multi_task_training", "presence_targets"]


def multi_task_loss(segmentation_weight: float, presence_weight: float
                    ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample loss ``input_loss(model, images, masks) -> [B]`` of the two heads.

    Row ``i`` is ``segmentation_weight * task.per_sample_loss(mask logits_i, mask_i) +
    presence_weight * cross_entropy(presence logits_i, presence(mask_i))``
    (:meth:`common.models.multi_task.MultiTaskUNet.multi_task_loss_per_sample`): it depends
    on row ``i`` only.
    """
    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample = getattr(getattr(model, "_module", model), "multi_task_loss_per_sample", None)
        if not callable(per_sample):
            raise ConfigError("--paradigm multi-task needs a model with several heads "
                              "(--model multi-task-unet)")
        out: torch.Tensor = per_sample(inputs, targets, segmentation_weight=segmentation_weight,
                                       presence_weight=presence_weight)
        return out

    return loss


def multi_task_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                        model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """One local step of both heads on the split's patients (one record per patient)."""
    from client.data.augment import augment_dataset
    from client.data.node_data import PatientRecordDataset
    from common.models.multi_task import is_multi_task_model

    if not is_multi_task_model(model):
        raise ConfigError(f"--paradigm multi-task needs --model multi-task-unet, the plan "
                          f"names {plan.model!r}",
                          safe_reason="refused: --paradigm multi-task needs a multi-task model")
    dataset = augment_dataset(PatientRecordDataset(split), plan.augment, task.info.name,
                              plan.samples)
    loss = multi_task_loss(float(options["segmentation-weight"]),
                           float(options["presence-weight"]))
    return NodeTraining(model=model, dataset=dataset, num_patients=split.num_patients,
                        losses={"input_loss": loss})
