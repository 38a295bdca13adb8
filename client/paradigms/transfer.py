"""The node's fine-tuning step of ``--paradigm transfer`` (stage ``fine-tune-rounds``).

The task's own supervised training (:func:`client.paradigms.supervised_training`) with the
layer groups named by ``freeze`` (:data:`common.paradigms.transfer.LAYER_GROUPS`) made
non-trainable: DP-SGD clips and noises only the trainable parameters, and the frozen ones go
back to the coordinator exactly as they came.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from client.data.node_data import NodeData, SplitArrays
from client.paradigms import NodeTraining, supervised_training
from common.config import TrainPlan
from common.paradigms.transfer import frozen_prefixes
from common.tasks.base import Task

__all__ = ["freeze_groups", "fine_tune_training"]


def freeze_groups(model: nn.Module, model_name: str, freeze: str) -> list[str]:
    """Make the parameters of the groups ``freeze`` names non-trainable; return their names."""
    prefixes = frozen_prefixes(model_name, freeze)
    frozen = [name for name, _ in model.named_parameters()
              if prefixes and name.startswith(prefixes)]
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def fine_tune_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                       model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """Supervised training of ``model`` with the chosen layer groups frozen (the node hook)."""
    step = supervised_training(plan, task, split, data, model, options)
    freeze_groups(step.model, plan.model, str(options["freeze"]))
    return step
