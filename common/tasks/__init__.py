"""Learning tasks: what a sample and a target are, the per-sample loss, the predictions.

One module per kind of task (``classification``, ``regression``, ``segmentation``,
``reconstruction``), one small Protocol (:class:`~common.tasks.base.Task`) and a registry
(:mod:`common.tasks.registry`). Importing the package registers every task.
"""

from __future__ import annotations

from common.tasks.base import ModelHead, SampleKind, TargetKind, Task, TaskInfo
from common.tasks.classification import BINARY, MULTICLASS, MULTILABEL, ORDINAL
from common.tasks.reconstruction import RECONSTRUCTION
from common.tasks.registry import (
    check_pair,
    get_task,
    list_tasks,
    register_task,
    sample_kinds,
    serves,
    tasks_of,
)
from common.tasks.regression import REGRESSION
from common.tasks.segmentation import SEGMENTATION

for _task in (BINARY, MULTICLASS, ORDINAL, MULTILABEL, REGRESSION, SEGMENTATION, RECONSTRUCTION):
    register_task(_task)

__all__ = [
    "BINARY", "MULTICLASS", "MULTILABEL", "ORDINAL", "RECONSTRUCTION", "REGRESSION",
    "SEGMENTATION", "ModelHead", "SampleKind", "TargetKind", "Task", "TaskInfo", "check_pair",
    "get_task", "list_tasks", "register_task", "sample_kinds", "serves", "tasks_of",
]
