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
import math
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig

__all__ = ["META", "TaskInference", "add_meta_analysis", "task_inference"]

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


META: dict[str, tuple[str, str]] = {
    "ordinal": ("ordinal", "kappa_quadratic"),
    "regression": ("regression", "mae"),
    "segmentation": ("segmentation", "dice"),
}
"""Per task, the per-site metric a between-hospital meta-analysis pools: ``(sub-section,
key)`` of its ``per_site`` rows (an estimate with ``se``, or a value beside ``<key>_se``)."""


def _site_effect(row: Any, key: str) -> tuple[float, float] | None:
    value, se = row.get(key), row.get(f"{key}_se")
    if isinstance(value, dict):
        value, se = value.get("value"), value.get("se")
    if not isinstance(value, (int, float)) or not isinstance(se, (int, float)):
        return None
    if not (math.isfinite(value) and math.isfinite(se) and se > 0):
        return None
    return float(value), float(se)


def add_meta_analysis(task: str, section: dict[str, Any], *, alpha: float = 0.05) -> None:
    """Add ``meta_<key>``: DerSimonian-Laird random-effects pooling of the hospitals' own
    estimates of the task's headline metric (:func:`common.stats.meta.random_effects`), where
    at least two hospitals have one with a positive standard error. A different estimand from
    the pooled-patient value: the metric of an average hospital, with tau² and I² measuring
    how much hospitals differ."""
    from common.stats.meta import random_effects

    where = META.get(task)
    part = section.get(where[0]) if where else None
    if where is None or not isinstance(part, dict):
        return
    effects = [(str(row.get("site")), effect) for row in part.get("per_site") or []
               if isinstance(row, dict) and (effect := _site_effect(row, where[1])) is not None]
    if len(effects) < 2:
        return
    names = [name for name, _ in effects]
    values = [value for _, (value, _) in effects]
    variances = [se * se for _, (_, se) in effects]
    section[f"meta_{where[1]}"] = random_effects(values, variances, alpha=alpha,
                                                 site_names=names).as_dict()


def task_inference(task: str) -> TaskInference:
    """The pooled inference of ``task`` (a task without one gets a 'not applicable' section),
    with the between-hospital meta-analysis of its headline metric where it has one."""
    run = _REGISTRY.get(task, _none)

    def with_meta(grid: Grid, node_ids: list[int], arrays: ArrayRecord,
                  config: RunConfig) -> dict[str, Any]:
        section = run(grid, node_ids, arrays, config)
        if section.get("status") == "completed":
            add_meta_analysis(task, section)
        return section

    return with_meta if task in META else run
