"""The tasks ``vesalius federation run|cv`` trains today, and the check made before a run.

:mod:`common.tasks` defines seven tasks (binary, multiclass, ordinal, multilabel, regression,
segmentation, reconstruction); only those in :data:`FEDERATED_TASKS` are wired through the
node's train/evaluate handlers, its statistics queries and the coordinator's pooled
inference. The others are defined (targets, per-sample losses, predictions, which models
serve them) but not yet wired into a federation: a plan naming one is refused, at the CLI
before anything starts and at the node before any data is read.
"""

from __future__ import annotations

from typing import Any

import torch

from common.errors import ConfigError
from common.models.registry import get_spec
from common.tasks import Task, check_pair, get_task
from common.tasks.base import SampleKind, TargetKind
from common.tasks.registry import serves

__all__ = ["FEDERATED_TASKS", "federated_task", "plan_samples", "prepare_for_training",
           "spatial_dims", "train_losses"]

FEDERATED_TASKS: tuple[str, ...] = ("binary", "multiclass", "ordinal", "multilabel",
                                    "regression", "segmentation", "reconstruction")
"""Tasks a federated run trains end to end (the CLI's ``--task`` choices)."""


def federated_task(task: str, model: str | None = None) -> Task:
    """The registered task ``task`` when a federation can train it (with ``model``, if given).

    Raises
    ------
    ConfigError
        ``task`` is not in :data:`FEDERATED_TASKS` (or not registered), or ``model`` does not
        serve it (the message names the models that do). Both carry a safe reason.
    """
    if task not in FEDERATED_TASKS:
        get_task(task)  # an unknown name: the registry's own sentence
        raise ConfigError(
            f"the {task} task is defined but not yet trained by a federation; "
            f"choose one of {', '.join(FEDERATED_TASKS)}",
            safe_reason=f"refused: the {task} task is not served by federated runs yet")
    return check_pair(task, model) if model is not None else get_task(task)


def plan_samples(task: Task, model: str, samples: str) -> SampleKind:
    """The plan's sample kind, when ``model`` serves ``task`` on it; else a sentence naming
    the kinds it does serve (:class:`~common.errors.ConfigError`)."""
    try:
        kind = SampleKind(samples)
    except ValueError:
        kinds = ", ".join(k.value for k in SampleKind)
        raise ConfigError(f"samples must be one of {kinds}, got {samples!r}",
                          safe_reason=f"refused: samples must be one of {kinds}") from None
    served = serves(task, get_spec(model))
    if kind not in served:
        names = ", ".join(s.value for s in served) or "none"
        raise ConfigError(
            f"model {model!r} does not serve the {task.info.name} task on {samples} samples; "
            f"it serves it on: {names}",
            safe_reason=f"refused: model {model!r} does not read {samples} samples for the "
            f"{task.info.name} task")
    return kind


def spatial_dims(samples: str) -> int:
    """2 for 2D images; 3 for volumes and series (a series is a volume read slice by slice)."""
    return 2 if SampleKind(samples) is SampleKind.IMAGE_2D else 3


def train_losses(task: Task) -> dict[str, Any]:
    """The loss arguments of :func:`client.training.train_dp` for ``task``.

    * classes (binary, multi-class) and masks: none, so the trainer keeps the model's own
      loss (a U-Net's Dice + cross-entropy, a DBN's phase loss) or cross-entropy, as before
      the task layer (unchanged results);
    * grades, findings and values: the task's per-sample loss of the outputs
      (``output_loss``);
    * the sample itself (reconstruction): the task's per-sample loss of the model and its
      inputs (``input_loss``).
    """
    target = task.info.target
    if target in (TargetKind.GRADE, TargetKind.CLASSES, TargetKind.VALUE):
        return {"output_loss": task.per_sample_loss}
    if target is TargetKind.SELF:
        model_loss = getattr(task, "model_loss")

        def input_loss(model: Any, inputs: Any, targets: Any) -> Any:
            return model_loss(model, inputs)

        return {"input_loss": input_loss}
    return {}


def prepare_for_training(task: Task, model: Any) -> Any:
    """Freeze what ``task``'s loss does not train, and return ``model``.

    A task with a ``prepare_model`` method uses it (reconstruction makes exactly the model's
    ``reconstruction_modules()`` trainable: never a classification head, whose parameters
    would get no per-sample gradient, which Opacus's clipping refuses, while noise alone
    would move them). A task trained on its loss of the model's outputs (grades, findings,
    values) freezes an autoencoder's ``decoder``, which ``forward`` never runs. Other tasks
    train every parameter the model leaves trainable.
    """
    prepare = getattr(task, "prepare_model", None)
    if callable(prepare):
        prepare(model)
    decoder = getattr(model, "decoder", None)
    if "output_loss" in train_losses(task) and isinstance(decoder, torch.nn.Module):
        # the task's loss sees forward() only, which never runs an autoencoder's decoder
        decoder.requires_grad_(False)
    return model
