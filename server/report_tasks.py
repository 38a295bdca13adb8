"""What the report shows for each task's pooled inference (a small registry).

``report.html``, ``summary.txt`` and the terminal look a run's task up here instead of
branching on its name. A task's :class:`TaskView` names the inference sub-section its
module writes (``inference[<key>]``) and the functions that render it: an HTML section
(:mod:`server.report_task_classes`, :mod:`server.report_task_measures`), plain-text summary
lines, and ``(label, value)`` rows for the terminal. The binary task keeps its own, richer
report (operating point, calibration); the multi-class one adds its plots to the generic
tables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from server import report_task_classes as classes
from server import report_task_measures as measures

__all__ = ["BOUNDED", "LOSS_LABELS", "ROUND_METRICS", "TaskView", "round_metrics", "round_value",
           "task_view"]

Section = Mapping[str, Any]


@dataclass(frozen=True)
class TaskView:
    """How one task's inference section is shown.

    Attributes
    ----------
    key : str
        The sub-section of ``inference`` the task writes (``"ordinal"``, ...).
    title : str
        The report section's title.
    html : callable
        ``html(section, overlays_html) -> str``: the section's HTML.
    summary : callable
        ``summary(section) -> list[str]``: lines for ``summary.txt`` (the first is the
        headline).
    rows : callable
        ``rows(section) -> list[tuple[str, str]]``: the terminal's table rows.
    """

    key: str
    title: str
    html: Callable[[Section, str], str]
    summary: Callable[[Section], list[str]]
    rows: Callable[[Section], list[tuple[str, str]]]


def _ignore_overlays(render: Callable[[Section], str]) -> Callable[[Section, str], str]:
    def html(section: Section, overlays_html: str) -> str:
        return render(section)

    return html


_VIEWS = {
    "ordinal": TaskView("ordinal", "Ordinal grading (pooled test patients)",
                        _ignore_overlays(classes.ordinal_section_html),
                        classes.ordinal_summary_lines, classes.ordinal_rows),
    "multilabel": TaskView("multilabel", "Findings (pooled test patients)",
                           _ignore_overlays(classes.multilabel_section_html),
                           classes.multilabel_summary_lines, classes.multilabel_rows),
    "regression": TaskView("regression", "Agreement with the reference (pooled test patients)",
                           _ignore_overlays(measures.regression_section_html),
                           measures.regression_summary_lines, measures.regression_rows),
    "segmentation": TaskView("segmentation", "Segmentation (pooled test patients)",
                             measures.segmentation_section_html,
                             measures.segmentation_summary_lines,
                             measures.segmentation_rows),
}


def task_view(task: Any) -> TaskView | None:
    """The view of ``task``'s inference section, or None (binary, multi-class, others)."""
    return _VIEWS.get(str(task)) if task is not None else None


ROUND_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "binary": (("val AUC", "auc"), ("acc@0.5", "accuracy")),
    "multiclass": (("val macro AUC", "auc"), ("acc", "accuracy")),
    "ordinal": (("exact grade", "accuracy"), ("grade MAE", "mae-grade")),
    "multilabel": (("val macro AUC", "auc"), ("finding acc@0.5", "accuracy")),
    "regression": (("val MAE", "mae"),),
    "segmentation": (("val Dice", "dice"),),
    "reconstruction": (),
}
"""Per task, the validation metrics a round shows beside its loss: ``(label, metric key)``
(``auc`` reads the pooled AUC when the round has one; keys of
:mod:`client.training.evaluate`'s replies)."""


def round_metrics(task: Any) -> tuple[tuple[str, str], ...]:
    """``ROUND_METRICS`` of ``task`` (the binary ones for an unknown task)."""
    return ROUND_METRICS.get(str(task), ROUND_METRICS["binary"])


RAW_THRESHOLD_NOTE = (
    "accuracy at 0.5 thresholds the model's raw score, which DP-SGD leaves uncalibrated: it can "
    "stay near one class's share of the patients while the AUC is high. The test metrics state "
    "the threshold they use.")
"""Said under a binary task's rounds when their accuracy at 0.5 is far below their AUC."""


def raw_threshold_misleads(task: Any, rounds: list[Mapping[str, Any]]) -> bool:
    """True for a binary task if some round's accuracy at 0.5 is more than 0.2 below its
    AUC (``rounds``: each round's metrics), as when every raw score falls on one side of 0.5."""
    if str(task) != "binary":
        return False
    for metrics in rounds:
        auc, accuracy = round_value(metrics, "auc"), metrics.get("accuracy")
        if isinstance(auc, (int, float)) and isinstance(accuracy, (int, float)) and auc - accuracy > 0.2:
            return True
    return False


CV_POOLING_NOTE = (
    "the pooled AUC ranks every fold's held-out patients together, each scored by its own "
    "fold's model; DP-SGD leaves those models' scores on different scales, so the pooled "
    "ranking mixes scales and reads lower than the folds' own AUCs. How well a model trained "
    "this way tells the classes apart is the mean of the folds' AUCs.")
"""Said with a cross-validation whose pooled AUC is far below the mean of its folds' AUCs."""

CV_RAW_THRESHOLD_NOTE = (
    "where a fold's threshold could not be chosen on validation, accuracy, sensitivity and "
    "specificity threshold its model's raw score at 0.5, "
    "which DP-SGD leaves uncalibrated: they can stay near one class's share of the patients "
    "while the AUC, which needs no threshold, is high.")
"""Said with a binary cross-validation whose fold accuracy is far below its AUC."""

CV_POOLING_GAP = 0.05
"""How far below the folds' mean AUC the pooled AUC is before :data:`CV_POOLING_NOTE` is said."""


def _value(estimate: Any) -> float | None:
    value = estimate.get("value") if isinstance(estimate, Mapping) else estimate
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) else None


def cv_notes(cv: Mapping[str, Any]) -> list[str]:
    """What a reader of a cross-validation's numbers needs told (``inference.cv``): the
    pooled AUC far below the folds' (:data:`CV_POOLING_NOTE`) and, for a binary task, fold
    accuracies at the raw 0.5 far below their AUCs (:data:`CV_RAW_THRESHOLD_NOTE`)."""
    notes = []
    pooled = cv.get("pooled") if isinstance(cv.get("pooled"), Mapping) else {}
    auc, mean = _value(pooled.get("auc")), _value(pooled.get("auc_mean"))
    if auc is not None and mean is not None and mean - auc > CV_POOLING_GAP:
        notes.append(CV_POOLING_NOTE)
    points = [d.get("operating_point") for d in cv.get("fold_details") or []
              if isinstance(d, Mapping)]
    at_half = "0.5" in str(cv.get("metric_ci_method", "")) or not points or any(
        not (isinstance(p, Mapping) and p.get("chosen_on")) for p in points)
    if str(cv.get("task") or "binary") == "binary" and at_half:
        folds = [f for f in cv.get("folds") or [] if isinstance(f, Mapping)]
        for row in [*folds, pooled]:
            auc, accuracy = _value(row.get("auc")), _value(row.get("accuracy"))
            if auc is not None and accuracy is not None and auc - accuracy > 0.2:
                notes.append(CV_RAW_THRESHOLD_NOTE)
                break
    return notes


def round_value(metrics: Mapping[str, Any], key: str) -> Any:
    """A round's value of ``key``: the pooled AUC (where released) for ``auc``."""
    if key == "auc":
        return metrics.get("auc-pooled", metrics.get("auc"))
    return metrics.get(key)


LOSS_LABELS: dict[str, str] = {
    "binary": "cross-entropy loss",
    "multiclass": "cross-entropy loss",
    "ordinal": "cumulative binary cross-entropy",
    "multilabel": "binary cross-entropy (sum over findings)",
    "regression": "squared error",
    "segmentation": "cross-entropy + (1 - Dice)",
    "reconstruction": "reconstruction error",
}
"""Per task, what its per-sample loss is (the training curves' axis)."""

BOUNDED = frozenset({"auc", "accuracy", "dice"})
"""Round metrics that lie in [0, 1] (plotted on a fixed axis)."""
