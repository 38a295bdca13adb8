"""Cross-validation of the non-binary tasks: each fold's held-out inference and the summary.

:mod:`server.cv` trains a fresh model per fold for every task. For a task other than
``binary`` it then calls :func:`evaluate_task_fold`: the fold's final model gets the task's
own pooled inference on the nodes' held-out patients (split ``heldout``; the nodes pick them
with :func:`client.data.folds.cv_splits`):

* ``multiclass``, ``ordinal``, ``multilabel``, ``regression``, ``segmentation``: the
  ``<task>_inference`` function of ``server.inference_<task>`` (the statistics queries behind
  :mod:`server.inference_tasks`, the nodes' release rules and ledgers apply), with
  ``split="heldout"``;
* ``reconstruction``: one evaluate round on the held-out patients; the fold's measure is the
  held-out reconstruction loss, the nodes' losses weighted by their ``num-examples``.

The whole section is kept per fold (``fold_details[i].heldout_inference``); the fold's row
carries the task's headline metrics (:data:`HEADLINE`) as estimate dicts (``value, lower,
upper, se, n, method``). Across folds (:func:`cv_section`) every headline metric gets its mean
and standard deviation (``ddof=1``) over the folds where it is defined; the pooled row's
metric is that mean (``method`` "mean over folds"). ``by_site`` gives each hospital's mean and
SD: for leave-one-site-out the folds' own metrics (each fold is one site), for k-fold the
per-site numbers of the task sections (where the task reports one per site).

Privacy: the held-out numbers come from the same statistics queries (or evaluate replies for
reconstruction) as a run's final inference; nothing else leaves the nodes.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from flwr.app import ArrayRecord
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig

if TYPE_CHECKING:
    from server.cv import FoldOutcome
    from server.strategies.fedavg import RoundLog

__all__ = [
    "HEADLINE",
    "TaskMetric",
    "cv_section",
    "evaluate_task_fold",
    "fold_details",
    "fold_metrics",
    "fold_row",
    "heldout_inference",
    "pooled_over_folds",
]

log = logging.getLogger(__name__)

MEAN_METHOD = "mean over folds"


@dataclass(frozen=True)
class TaskMetric:
    """One headline metric of a task's held-out section.

    Attributes
    ----------
    name : str
        The key in the CV rows (``kappa_quadratic``, ``mae``, ...).
    path : tuple[str, ...]
        Where the section holds it (an estimate dict or a number).
    site_key : str
        The key of the section's ``per_site`` rows holding the site's own value ("" when the
        task reports none per site).
    higher_is_better : bool
        For readers of the table.
    """

    name: str
    path: tuple[str, ...]
    site_key: str = ""
    higher_is_better: bool = True


HEADLINE: dict[str, tuple[TaskMetric, ...]] = {
    "multiclass": (TaskMetric("macro_auc", ("multiclass", "auc", "macro"), "macro_auc"),),
    "ordinal": (TaskMetric("kappa_quadratic", ("ordinal", "kappa_quadratic"),
                           "kappa_quadratic"),),
    "multilabel": (TaskMetric("macro_auc", ("multilabel", "auc", "macro"), "macro_auc"),),
    "regression": (TaskMetric("mae", ("regression", "mae"), "mae", higher_is_better=False),
                   TaskMetric("r2", ("regression", "r2"))),
    "segmentation": (TaskMetric("dice", ("segmentation", "dice"), "dice"),),
    "reconstruction": (TaskMetric("loss", ("reconstruction", "loss"), "loss",
                                  higher_is_better=False),),
}
"""The metrics a cross-validation of each task reports per fold and over folds."""

_INFERENCE: dict[str, tuple[str, str]] = {
    "multiclass": ("server.inference_multiclass", "multiclass_inference"),
    "ordinal": ("server.inference_ordinal", "ordinal_inference"),
    "multilabel": ("server.inference_multilabel", "multilabel_inference"),
    "regression": ("server.inference_regression", "regression_inference"),
    "segmentation": ("server.inference_segmentation", "segmentation_inference"),
}


def headline(task: str) -> tuple[TaskMetric, ...]:
    """The headline metrics of ``task`` (none for an unknown task)."""
    return HEADLINE.get(task, ())


# --- one fold ---------------------------------------------------------------------------------


def _reconstruction_section(entry: RoundLog) -> dict[str, Any]:
    """The held-out reconstruction loss of one evaluate round, weighted by num-examples."""
    rows = []
    for reply in entry.evaluate:
        n = int(reply.metrics.get(k.NUM_EXAMPLES, 0))
        loss = _finite(reply.metrics.get(k.LOSS))
        rows.append({"site": reply.site, "n": n, "loss": loss})
    usable = [r for r in rows if r["n"] > 0 and r["loss"] is not None]
    out: dict[str, Any] = {"task": "reconstruction", "split": k.SPLIT_HELDOUT,
                           "sites": [r["site"] for r in rows],
                           "failures": [dict(e) for e in entry.errors]}
    n = sum(r["n"] for r in usable)
    if not n:
        out.update(status="failed", n=0, reason="no node returned a held-out reconstruction "
                   "loss (see errors)")
        return out
    loss = sum(r["loss"] * r["n"] for r in usable) / n
    out.update(status="completed", reason="", n=n)
    out["reconstruction"] = {
        "loss": {"value": loss, "lower": None, "upper": None, "se": None, "n": n,
                 "method": "mean of the nodes' held-out losses weighted by num-examples"},
        "per_site": sorted(rows, key=lambda r: str(r["site"])),
    }
    return out


def heldout_inference(
    grid: Grid, node_ids: list[int], arrays: ArrayRecord, config: RunConfig,
) -> tuple[dict[str, Any], RoundLog | None]:
    """The task's pooled inference of ``arrays`` on the nodes' held-out patients.

    Returns the section (the task module's schema, ``split`` "heldout"; a ``status``
    "failed" section with a ``reason`` when it could not be computed, never an exception)
    and, for reconstruction, the evaluate round (its errors belong to the fold).
    """
    task = config.plan.task
    if task == "reconstruction":
        from server.cv import evaluate_heldout  # server.cv imports this module

        entry, _ = evaluate_heldout(grid, arrays, config.plan.to_record(),
                                    timeout=config.round_timeout)
        return _reconstruction_section(entry), entry
    if task not in _INFERENCE:
        return {"task": task, "status": "failed", "split": k.SPLIT_HELDOUT,
                "reason": f"no held-out inference for task {task!r}"}, None
    module, function = _INFERENCE[task]
    fn = getattr(importlib.import_module(module), function)
    try:
        section: dict[str, Any] = fn(grid, node_ids, arrays, config.plan,
                                     split=k.SPLIT_HELDOUT, timeout=config.round_timeout)
    except Exception as exc:  # noqa: BLE001 - one fold's inference must not end the CV
        log.warning("held-out %s inference failed: %s", task, exc)
        section = {"task": task, "status": "failed", "split": k.SPLIT_HELDOUT,
                   "reason": f"{type(exc).__name__}: {exc}"}
    return section, None


def _finite(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _estimate(value: object, *, method: str = "") -> dict[str, Any] | None:
    """An estimate dict of ``value`` (an estimate dict or a number); None when undefined."""
    if isinstance(value, Mapping):
        point = _finite(value.get("value"))
        if point is None:
            return None
        return {"value": point, "lower": _finite(value.get("lower")),
                "upper": _finite(value.get("upper")), "se": _finite(value.get("se")),
                "n": value.get("n"), "method": value.get("method") or method}
    point = _finite(value)
    if point is None:
        return None
    return {"value": point, "lower": None, "upper": None, "se": None, "n": None,
            "method": method}


def _at(section: Mapping[str, Any], path: Sequence[str]) -> object:
    node: object = section
    for key in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(key)
    return node


def fold_metrics(task: str, section: Mapping[str, Any]) -> dict[str, dict[str, Any] | None]:
    """The headline metrics of one fold's section (:data:`HEADLINE`), None where undefined."""
    return {m.name: _estimate(_at(section, m.path)) for m in headline(task)}


def evaluate_task_fold(grid: Grid, arrays: ArrayRecord, config: RunConfig,
                       outcome: FoldOutcome) -> None:
    """Held-out results of one fold of a non-binary task, into ``outcome``.

    ``outcome.section`` is the task's held-out section, ``outcome.summary`` holds ``n``, the
    headline metrics and where they came from; the fold is "completed" when the first
    headline metric is defined, else "incomplete" with the reason.
    """
    task = config.plan.task
    section, entry = heldout_inference(grid, list(grid.get_node_ids()), arrays, config)
    outcome.section = section
    if entry is not None:
        outcome.heldout = entry
    else:
        outcome.query_failures = [dict(f) for f in section.get("failures") or []]
    metrics = fold_metrics(task, section)
    source = ("evaluate replies (held-out loss)" if task == "reconstruction"
              else f"statistics queries ({_INFERENCE.get(task, ('none', ''))[0]})")
    notes = [str(section[key]) for key in ("metrics_note", "note", "auc_note")
             if section.get(key)]
    outcome.summary = {"source": source, "source_note": "; ".join(notes) or None,
                       "n": int(section.get("n") or 0), **metrics,
                       "extra": {"noised": section.get("noised"),
                                 "suppressed_cells": section.get("suppressed_cells")}}
    first = headline(task)[0].name if headline(task) else ""
    if section.get("status") == "completed" and first and metrics.get(first):
        outcome.status = "completed"
        return
    outcome.status = "incomplete"
    outcome.reason = (str(section.get("reason") or "") if section.get("status") != "completed"
                      else "") or f"held-out {first or 'metric'} undefined for this fold"


def fold_row(outcome: FoldOutcome, task: str) -> dict[str, Any]:
    """The fold's row of ``inference.cv.folds`` for a non-binary task."""
    from server.cv import epsilon_by_site  # server.cv imports this module
    s = outcome.summary
    return {
        "fold": outcome.fold,
        "held_out": outcome.label,
        "status": outcome.status,
        "n": s.get("n", 0),
        **{m.name: s.get(m.name) for m in headline(task)},
        "epsilon_by_site": epsilon_by_site(outcome.sites),
        "issues": len(outcome.errors({})) + (1 if outcome.reason else 0),
    }


def _site_rows(outcome: FoldOutcome, task: str) -> list[dict[str, Any]]:
    section = outcome.section or {}
    rows = _at(section, (task, "per_site"))
    out = []
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, Mapping):
            out.append({"site": row.get("site"), "n": row.get("n"),
                        **{m.name: _estimate(row.get(m.site_key), method="the site's own "
                                             "released statistics")
                           for m in headline(task) if m.site_key}})
    return sorted(out, key=lambda r: str(r["site"]))


def fold_details(outcome: FoldOutcome, task: str, names: Mapping[int, str]) -> dict[str, Any]:
    """The fold's entry of ``inference.cv.fold_details`` for a non-binary task."""
    extra = outcome.summary.get("extra") or {}
    return {
        "fold": outcome.fold,
        "run_id": outcome.run_id,
        "holdout_site": outcome.holdout_site or None,
        "status": outcome.status,
        "reason": outcome.reason,
        "source": outcome.summary.get("source"),
        "source_note": outcome.summary.get("source_note"),
        "noised": extra.get("noised"),
        "suppressed_cells": extra.get("suppressed_cells"),
        "train_patients_by_site": {row["site"]: row["num_examples"] for row in outcome.sites},
        # a note instead of rows where secure aggregation hides the hospitals' values
        "heldout_by_site": (hidden if isinstance(hidden := _at(outcome.section or {},
                                                               (task, "per_site")), str)
                            else _site_rows(outcome, task)),
        "errors": outcome.errors(names),
        "report": str(outcome.directory / "report.json"),
        "heldout_inference": outcome.section,
        "notes": list(outcome.notes),
    }


# --- across folds -----------------------------------------------------------------------------


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = float(np.mean(values))
    return mean, float(np.std(values, ddof=1)) if len(values) >= 2 else None


def _spread(values: list[float], folds: list[int]) -> dict[str, Any]:
    mean, sd = _mean_sd(values)
    return {"mean": mean, "sd": sd, "n_folds": len(values), "folds": folds, "values": values}


def pooled_over_folds(folds: Sequence[FoldOutcome], task: str) -> dict[str, Any]:
    """The pooled row: each headline metric's mean over the folds where it is defined.

    ``<metric>`` is an estimate dict whose ``value`` is the mean (no interval: folds are not
    independent samples), ``<metric>_mean`` and ``<metric>_sd`` (``ddof=1``; None with fewer
    than two folds) repeat it flat; ``n`` counts the held-out patients of the folds included.
    """
    metrics = headline(task)
    first = metrics[0].name if metrics else ""
    included = [f for f in folds if first and f.summary.get(first)]
    out: dict[str, Any] = {"held_out": "all folds",
                           "n": int(sum(int(f.summary.get("n") or 0) for f in included))}
    for m in metrics:
        values = [float(f.summary[m.name]["value"]) for f in folds if f.summary.get(m.name)]
        mean, sd = _mean_sd(values)
        out[m.name] = None if mean is None else {
            "value": mean, "lower": None, "upper": None, "se": None, "n": len(values),
            "method": MEAN_METHOD}
        out[f"{m.name}_mean"], out[f"{m.name}_sd"] = mean, sd
    out["folds_included"] = [f.fold for f in included]
    out["note"] = ("each metric: mean (and SD, ddof=1) of the folds' own held-out values, "
                   "over the folds where it is defined; each patient is held out once")
    return out


def by_site(folds: Sequence[FoldOutcome], task: str, mode: str) -> dict[str, dict[str, Any]]:
    """Per hospital, each headline metric's values over folds with mean and SD.

    Leave-one-site-out: the fold that held the site out (its own metrics). k-fold: the
    per-site numbers of each fold's section, for the metrics a task reports per site.
    """
    metrics = headline(task)
    gathered: dict[str, dict[str, tuple[list[float], list[int]]]] = {}

    def add(site: str, name: str, value: object, fold: int) -> None:
        est = _estimate(value)
        if est is not None:
            values, fold_ids = gathered.setdefault(site, {}).setdefault(name, ([], []))
            values.append(float(est["value"]))
            fold_ids.append(fold)

    for outcome in folds:
        if mode == "loso":
            for m in metrics:
                add(outcome.label, m.name, outcome.summary.get(m.name), outcome.fold)
        else:
            for row in _site_rows(outcome, task):
                for m in metrics:
                    if m.site_key:
                        add(str(row["site"]), m.name, row.get(m.name), outcome.fold)
    return {site: {name: _spread(*pair) for name, pair in per.items()}
            for site, per in sorted(gathered.items())}


def cv_section(folds: Sequence[FoldOutcome], task: str, *, mode: str, num_folds: int,
               alpha: float, names: Mapping[int, str]) -> dict[str, Any]:
    """``inference.cv`` of a non-binary task (see :mod:`server.cv` for the schema)."""
    metrics = headline(task)
    return {
        "task": task,
        "metric": metrics[0].name if metrics else None,
        "metrics": [m.name for m in metrics],
        "lower_is_better": [m.name for m in metrics if not m.higher_is_better],
        "mode": mode,
        "num_folds": num_folds,
        "alpha": alpha,
        "metric_method": "each fold: the task's pooled held-out inference on that fold's model "
        "(statistics queries; reconstruction: evaluate replies); over folds: mean and SD",
        "folds": [fold_row(f, task) for f in folds],
        "pooled": pooled_over_folds(folds, task),
        "by_site": by_site(folds, task, mode),
        "fold_details": [fold_details(f, task, names) for f in folds],
    }
