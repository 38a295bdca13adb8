"""The task registry and which models serve which task.

A model serves a task when it has the task's head (``ModelSpec.tasks``: ``classification``
for the classification and regression tasks, ``segmentation``, ``reconstruction``) and supports one of the task's sample kinds (2D images
need ``spatial_dims`` 2, volumes 3, series a recurrent or multi-instance model).
"""

from __future__ import annotations

from common.errors import ConfigError
from common.models.registry import ModelSpec, get_spec
from common.tasks.base import ModelHead, SampleKind, Task

__all__ = ["check_pair", "get_task", "list_tasks", "register_task", "sample_kinds", "serves",
           "tasks_of"]

_TASKS: dict[str, Task] = {}


def register_task(task: Task) -> Task:
    """Add ``task`` under ``task.info.name`` (a name can be registered once)."""
    name = task.info.name
    if name in _TASKS and _TASKS[name] is not task:
        raise ConfigError(f"task {name!r} is registered twice")
    _TASKS[name] = task
    return task


def list_tasks() -> list[Task]:
    """Every registered task, in registration order."""
    return list(_TASKS.values())


def get_task(name: str) -> Task:
    """The task named ``name``; an unknown name is refused with the valid ones."""
    try:
        return _TASKS[name]
    except KeyError:
        raise ConfigError(f"unknown task {name!r}; choose one of {', '.join(_TASKS)}",
                          safe_reason="unknown task") from None


def _has_head(spec: ModelSpec, head: ModelHead) -> bool:
    return head.value in spec.tasks


def sample_kinds(spec: ModelSpec) -> tuple[SampleKind, ...]:
    """The sample kinds a model takes: from its spatial dimensions and family."""
    kinds = []
    if 2 in spec.spatial_dims:
        kinds.append(SampleKind.IMAGE_2D)
    if 3 in spec.spatial_dims:
        kinds.append(SampleKind.VOLUME_3D)
    if spec.family in ("rnn", "mil"):  # recurrent or attention-pooled slices
        kinds.append(SampleKind.SERIES)
    return tuple(kinds)


def serves(task: Task, spec: ModelSpec) -> tuple[SampleKind, ...]:
    """The sample kinds on which ``spec`` serves ``task`` (empty: it does not)."""
    if not _has_head(spec, task.info.head):
        return ()
    return tuple(kind for kind in sample_kinds(spec) if kind in task.info.samples)


def tasks_of(model: str) -> list[str]:
    """Names of the tasks the model ``model`` serves."""
    spec = get_spec(model)
    return [task.info.name for task in _TASKS.values() if serves(task, spec)]


def check_pair(task: str, model: str) -> Task:
    """The task, when ``model`` serves it; otherwise a sentence naming what does fit."""
    chosen = get_task(task)
    spec = get_spec(model)
    if serves(chosen, spec):
        return chosen
    from common.models import list_models

    fitting = [m.name for m in list_models() if serves(chosen, m)]
    raise ConfigError(
        f"model {model!r} does not serve the {task} task (it serves "
        f"{', '.join(tasks_of(model)) or 'no registered task'}); models for {task}: "
        f"{', '.join(fitting) or 'none'}",
        safe_reason="the model does not serve the task")
