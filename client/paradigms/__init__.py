"""What one local training step is under the run's learning paradigm (the node's side).

:func:`node_training` is the seam :func:`client.app.handle_train` goes through: the run's
paradigm (:mod:`common.paradigms`) names a hook (``Paradigm.node``) that returns a
:class:`NodeTraining`; supervised runs (and paradigms without a hook) get
:func:`supervised_training`. The privacy unit is always the patient: ``num_patients`` is what
the node's accountant plans the noise for and the ledger records, so a hook that trains on
more patients than the labelled ones (unlabelled patients, say) must count them there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn
from torch.utils.data import Dataset

from client.data.node_data import NodeData, SplitArrays
from common.config import TrainPlan
from common.paradigms import get_paradigm, load_path, read_options
from common.tasks.base import Task

__all__ = ["NodeTraining", "node_training", "supervised_training"]


@dataclass
class NodeTraining:
    """The inputs of one :func:`client.training.train_dp` call.

    Attributes
    ----------
    model : torch.nn.Module
        The model to train, prepared (parts frozen, heads added) for the paradigm.
    dataset : torch.utils.data.Dataset
        One record per patient (the DP unit).
    num_patients : int
        Patients the step may touch: the records of ``dataset``; what the accountant plans for.
    losses : dict
        ``output_loss`` / ``input_loss`` arguments of ``train_dp`` (empty: the model's own).
    """

    model: nn.Module
    dataset: Dataset[Any]
    num_patients: int
    losses: dict[str, Any] = field(default_factory=dict)


def supervised_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                        model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """The task's own training on the split's patients (the default paradigm), each record
    augmented as the plan's ``augment`` says (:func:`client.data.augment.augment_dataset`)."""
    from client.data.augment import augment_dataset
    from client.data.node_data import PatientRecordDataset
    from common.tasks.federated import prepare_for_training, train_losses

    dataset = augment_dataset(PatientRecordDataset(split), plan.augment, task.info.name,
                              plan.samples)
    return NodeTraining(model=prepare_for_training(task, model), dataset=dataset,
                        num_patients=split.num_patients, losses=train_losses(task))


def node_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                  model: nn.Module) -> NodeTraining:
    """The training step of ``plan``'s paradigm (a :class:`common.errors.ConfigError` for a
    paradigm or options this node does not know)."""
    paradigm = get_paradigm(plan.paradigm)
    options = read_options(paradigm, plan.paradigm_options)
    hook = load_path(paradigm.node) if paradigm.node else supervised_training
    return hook(plan, task, split, data, model, options)  # type: ignore[no-any-return]
