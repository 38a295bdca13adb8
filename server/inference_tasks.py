"""Which pooled inference the final model of each task gets (a small registry).

The coordinator's :func:`server.app.final_inference` looks the run's task up here instead of
branching on its name. Every entry has the signature of :data:`TaskInference` and returns the
report's ``inference`` section (a JSON-able dict); the modules are imported when used.

* ``binary``: calibration, operating point on validation and test metrics at it
  (:func:`server.final_model.calibrated_inference`);
* ``multiclass``: :func:`server.inference_multiclass.multiclass_inference`;
* ``ordinal``, ``multilabel``, ``regression``, ``segmentation``: their modules'
  ``<task>_inference`` on the test split;
* ``reconstruction``: none (the output is the pretrained checkpoint; the per-round
  validation loss is its measure).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig

__all__ = ["TaskInference", "task_inference"]

TaskInference = Callable[[Grid, list[int], ArrayRecord, RunConfig], dict[str, Any]]
"""``(grid, node_ids, final arrays, run config) -> inference section``."""


def _binary(grid: Grid, node_ids: list[int], arrays: ArrayRecord,
            config: RunConfig) -> dict[str, Any]:
    from server.final_model import calibrated_inference

    return calibrated_inference(grid, node_ids, arrays, config.plan,
                                timeout=config.round_timeout,
                                target_sensitivity=config.target_sensitivity)


def _on_test(module: str, function: str) -> TaskInference:
    def run(grid: Grid, node_ids: list[int], arrays: ArrayRecord,
            config: RunConfig) -> dict[str, Any]:
        fn = getattr(importlib.import_module(module), function)
        section: dict[str, Any] = fn(grid, node_ids, arrays, config.plan, split=k.SPLIT_TEST,
                                     timeout=config.round_timeout)
        return section

    return run


def _none(grid: Grid, node_ids: list[int], arrays: ArrayRecord,
          config: RunConfig) -> dict[str, Any]:
    return {"status": "not applicable",
            "reason": "self-supervised pretraining: the output is the checkpoint "
                      "(checkpoints/final.pt) that --init-from fine-tunes; its measure is the "
                      "validation reconstruction loss per round"}


_REGISTRY: dict[str, TaskInference] = {
    "binary": _binary,
    "multiclass": _on_test("server.inference_multiclass", "multiclass_inference"),
    "ordinal": _on_test("server.inference_ordinal", "ordinal_inference"),
    "multilabel": _on_test("server.inference_multilabel", "multilabel_inference"),
    "regression": _on_test("server.inference_regression", "regression_inference"),
    "segmentation": _on_test("server.inference_segmentation", "segmentation_inference"),
    "reconstruction": _none,
}


def task_inference(task: str) -> TaskInference:
    """The pooled inference of ``task`` (a task without one gets a 'not applicable' section)."""
    return _REGISTRY.get(task, _none)
