"""report.html per task: the training table and curves, the per-hospital results and the
configuration show the run's own task metrics (not a binary AUC column of dashes)."""

from __future__ import annotations

from typing import Any

import pytest

from server.report_html import build_html
from server.report_tasks import ROUND_METRICS, round_metrics


def _report(task: str, metrics: dict[str, float]) -> dict[str, Any]:
    rounds = [{"round": r, "metrics": {"loss": 2.0 / r, "train-loss": 2.5 / r, **metrics},
               "train": [{"site": "site-1"}], "errors": []} for r in (1, 2)]
    return {"status": "completed", "config": {"task": task, "model": "cnn", "samples": "image-2d"},
            "rounds": rounds,
            "final": {"sites": [{"site": "site-1", "num-examples": 7, "loss": 1.5, **metrics}]},
            "inference": {}}


@pytest.mark.parametrize(("task", "metrics", "column"), [
    ("regression", {"mae": 3.25}, "Validation MAE"),
    ("segmentation", {"dice": 0.625}, "Validation Dice"),
    ("ordinal", {"accuracy": 0.5, "mae-grade": 0.75}, "Validation grade MAE"),
])
def test_the_training_table_and_site_results_show_the_tasks_metrics(
    task: str, metrics: dict[str, float], column: str
) -> None:
    page = build_html(_report(task, metrics))
    assert column in page and "Validation AUC" not in page
    for value in metrics.values():
        assert f"<td>{value:g}</td>" in page or f"<td>{value}</td>" in page
    assert "Learning task" in page and task in page


def test_every_task_has_round_metrics_and_binary_keeps_its_auc() -> None:
    from common.tasks import list_tasks

    assert {t.info.name for t in list_tasks()} == set(ROUND_METRICS)
    assert round_metrics("binary")[0] == ("val AUC", "auc")
    assert "Validation AUC" in build_html(_report("binary", {"auc": 0.9, "accuracy": 0.8}))
