"""A cross-validation's numbers a reader would misread are explained, on screen and on the page:
a pooled AUC far below the folds' own, and fold accuracies at the raw 0.5 far below their AUCs."""

from __future__ import annotations

from typing import Any

import pytest

from cli.console import console
from cli.federation import print_cv_report
from server.report_sections import headline_section
from server.report_tables import cv as cv_section
from server.report_tasks import CV_POOLING_NOTE, CV_RAW_THRESHOLD_NOTE, cv_notes


def _est(value: float) -> dict[str, Any]:
    return {"value": value, "lower": value - 0.02, "upper": min(1.0, value + 0.02), "se": 0.01,
            "n": 500, "method": "delong"}


def _doc(pooled_auc: float, accuracy: float) -> dict[str, Any]:
    # the shape of a real 3-fold run's report (demo data, 13:40 UTC): folds at AUC 0.92-0.96
    # and accuracy 0.57 at the raw 0.5, pooled AUC 0.67
    folds = [{"fold": f, "held_out": f"fold-{f}", "status": "completed", "n": 500,
              "auc": _est(a), "accuracy": _est(accuracy), "sensitivity": _est(0.0),
              "specificity": _est(1.0), "epsilon_by_site": {"site-1": 5.4 + f}, "issues": 0}
             for f, a in enumerate((0.924, 0.955, 0.964))]
    cv = {"mode": "kfold", "num_folds": 3, "task": "binary", "folds": folds, "fold_details": [],
          "metric_ci_method": "wilson (threshold 0.5)",
          "pooled": {"held_out": "all folds", "n": 1500, "auc": _est(pooled_auc),
                     "accuracy": _est(accuracy), "auc_mean": 0.948, "auc_sd": 0.021,
                     "folds_included": [0, 1, 2]}}
    return {"kind": "cross-validation", "status": "completed", "config": {"private": True},
            "inference": {"cv": cv, "n": 1500},
            "sites": [{"site": "site-1", "epsilon": 7.9963}]}


def _flat(text: str) -> str:
    return " ".join(text.split())


@pytest.mark.parametrize(("pooled_auc", "accuracy", "notes"), [
    (0.671, 0.573, [CV_POOLING_NOTE, CV_RAW_THRESHOLD_NOTE]),
    (0.940, 0.573, [CV_RAW_THRESHOLD_NOTE]),
    (0.671, 0.900, [CV_POOLING_NOTE]),
    (0.940, 0.900, []),
])
def test_cross_validation_notes_on_screen_and_on_the_page(pooled_auc: float, accuracy: float,
                                                          notes: list[str]) -> None:
    doc = _doc(pooled_auc, accuracy)
    assert cv_notes(doc["inference"]["cv"]) == notes
    with console.capture() as cap:
        print_cv_report(doc)
    screen = _flat(cap.get())
    page = _flat(headline_section(doc) + cv_section(doc["inference"]["cv"])).replace("&#x27;", "'")
    for note in (CV_POOLING_NOTE, CV_RAW_THRESHOLD_NOTE):
        shown = note in notes
        assert (_flat(note[1:]) in screen) is shown
        assert (_flat(note[1:]) in page) is shown
    # and the cross-validation's ε, rounded up
    assert "ε for the whole cross-validation (patient level, RDP): site-1 8.00" in screen
