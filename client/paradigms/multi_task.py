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
from torch.nn import functional as F

from client.data.node_data import NodeData, SplitArrays
from client.paradigms import NodeTraining
from common.config import TrainPlan
from common.errors import ConfigError
from common.tasks.base import Task

__all__ = ["multi_task_loss", "multi_task_training", "presence_targets"]


def presence_targets(masks: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: 1 where a sample's mask ``[B, *spatial]`` has a foreground pixel."""
    return (masks.flatten(1) >= 1).any(dim=1).long()


def multi_task_loss(task: Task, segmentation_weight: float, presence_weight: float
                    ) -> Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]:
    """The per-sample loss ``input_loss(model, images, masks) -> [B]`` of the two heads.

    Row ``i`` is ``segmentation_weight * task.per_sample_loss(mask logits_i, mask_i) +
    presence_weight * cross_entropy(presence logits_i, presence(mask_i))``: it depends on
    row ``i`` only.
    """
    def loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        heads = getattr(getattr(model, "_module", model), "heads", None)
        if not callable(heads):
            raise ConfigError("--paradigm multi-task needs a model with several heads "
                              "(--model multi-task-unet)")
        segmentation, presence = heads(inputs)
        masks = targets.long()
        seg = task.per_sample_loss(segmentation, masks)
        pres = F.cross_entropy(presence, presence_targets(masks), reduction="none")
        return segmentation_weight * seg + presence_weight * pres

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
    loss = multi_task_loss(task, float(options["segmentation-weight"]),
                           float(options["presence-weight"]))
    return NodeTraining(model=model, dataset=dataset, num_patients=split.num_patients,
                        losses={"input_loss": loss})
