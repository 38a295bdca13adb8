"""The tasks ``vesalius federation run|cv`` trains today, and the check made before a run.

:mod:`common.tasks` defines seven tasks (binary, multiclass, ordinal, multilabel, regression,
segmentation, reconstruction); only those in :data:`FEDERATED_TASKS` are wired through the
node's train/evaluate handlers, its statistics queries and the coordinator's pooled
inference. The others are defined (targets, per-sample losses, predictions, which models
serve them) but not yet wired into a federation: a plan naming one is refused, at the CLI
before anything starts and at the node before any data is read.
"""

from __future__ import annotations

from common.errors import ConfigError
from common.tasks import Task, check_pair, get_task

__all__ = ["FEDERATED_TASKS", "federated_task"]

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
