"""The node's steps of an ensemble: its members with dropout, its stacker.

Members with ``-P dropout=p`` (stage paradigm ``ensemble-member``) train as supervised runs
with dropout of rate ``p`` on the input of the model's last linear layer
(:func:`add_dropout`: a forward pre-hook, so the weights and their names are the model's own
and FedAvg, checkpoints and every query read them unchanged); the ``ensemble-scores`` query
switches the same dropout on for its MC-dropout passes.

The stacker (stage paradigm ``ensemble-stacker``):
The stacker is a linear head over the logits ``z_i = log p_i / (1 - p_i)`` of ``M`` frozen
members: ``logit p = b + sum_i w_i z_i``. Its model (:class:`Stacker`) holds the members
(``members.<i>.*``, frozen, always in eval mode: no dropout) and the head (``head.weight``,
``head.bias``), so the coordinator's arrays carry all of it and FedAvg leaves the members as
they are. The step trains on the node's *validation* patients (the members never saw them;
the test patients stay untouched for the report), one record per patient, with the task's
own loss under DP-SGD; the accountant and the ledger count those patients.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from flwr.app import ArrayRecord
from torch import nn

from client.data.node_data import NodeData, SplitArrays
from client.paradigms import NodeTraining
from common.config import TrainPlan
from common.errors import ConfigError
from common.paradigms import get_paradigm, read_options
from common.tasks.base import Task

__all__ = ["Stacker", "add_dropout", "has_dropout", "member_training", "stacker_model",
           "stacker_training"]


def _dropout_input(p: float, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return (torch.nn.functional.dropout(args[0], p, module.training), *args[1:])


def has_dropout(model: nn.Module) -> bool:
    """Whether ``model`` has a dropout layer of positive rate."""
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and float(m.p) > 0
               for m in model.modules())


def add_dropout(model: nn.Module, p: float) -> nn.Module:
    """Dropout of rate ``p`` on the input of ``model``'s last linear layer, active in train
    mode only (a forward pre-hook: no new weights); ``model`` is returned."""
    if p <= 0:
        return model
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError("no linear layer for dropout", safe_reason="refused: the model has no "
                          "linear layer to put the ensemble's dropout before")
    linear[-1].register_forward_pre_hook(partial(_dropout_input, float(p)))
    return model


def member_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                    model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """A member's supervised step with dropout before its last linear layer."""
    from client.paradigms import supervised_training

    training = supervised_training(plan, task, split, data, model, {})
    add_dropout(training.model, float(options["dropout"]))
    return training


class Stacker(nn.Module):
    """``M`` frozen members and a trainable linear head over their logits (2-class output).

    Parameters
    ----------
    members : list of torch.nn.Module
        Binary models with 2 logits each; frozen here.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        for p in self.members.parameters():
            p.requires_grad_(False)
        self.head = nn.Linear(len(members), 1)
        with torch.no_grad():  # start as the average of the members' logits
            self.head.weight.fill_(1.0 / len(members))
            self.head.bias.zero_()

    def train(self, mode: bool = True) -> Stacker:
        """Train the head only: the members stay in eval mode (no dropout)."""
        super().train(mode)
        self.members.eval()
        return self

    def member_logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, M)`` logits of class 1 of every member."""
        with torch.no_grad():
            out = [m(x) for m in self.members]
        return torch.stack([o[:, 1] - o[:, 0] for o in out], dim=1).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.head(self.member_logits(x))
        return torch.cat([torch.zeros_like(s), s], dim=1)


def stacker_model(plan: TrainPlan, arrays: ArrayRecord) -> Stacker:
    """The stacker of ``plan`` (members of ``plan.model``) with the weights in ``arrays``."""
    from client.app import build_plan_model

    members = int(read_options(get_paradigm(plan.paradigm), plan.paradigm_options)["members"])
    model = Stacker([build_plan_model(plan) for _ in range(members)])
    try:
        model.load_state_dict(arrays.to_torch_state_dict())
    except RuntimeError:
        raise ConfigError("stacker weights do not fit", safe_reason=f"refused: the weights "
                          f"sent do not fit a stacker of {members} {plan.model!r} members") from None
    return model


def stacker_training(plan: TrainPlan, task: Task, split: SplitArrays, data: NodeData,
                     model: nn.Module, options: dict[str, Any]) -> NodeTraining:
    """DP-SGD of the stacker's head on the node's validation patients (``split`` unused)."""
    from client.data.node_data import PatientRecordDataset
    from common.tasks.federated import train_losses

    if not isinstance(model, Stacker):
        raise ConfigError("not a stacker", safe_reason="refused: the ensemble-stacker step "
                          "needs a stacker model")
    if data.val.num_patients == 0:
        raise ConfigError("no validation patients", safe_reason="refused: the stacker trains "
                          "on validation patients and this node has none")
    return NodeTraining(model=model, dataset=PatientRecordDataset(data.val),
                        num_patients=data.val.num_patients, losses=train_losses(task))
