"""Report fragments of the multi-class, ordinal and multi-label tasks (HTML, summary, CLI rows).

Sections are written by hand in the schema of :mod:`server.inference_ordinal`,
:mod:`server.inference_multilabel` and :mod:`server.inference_multiclass`; the tests check
what a reader sees: the numbers, escaping of hospital names and notes, and the plots (their
drawn counts and AUCs against scikit-learn on the histograms' expanded scores).
"""

from __future__ import annotations

import base64
import re
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.report_task_classes import (
    multiclass_plots_html,
    multilabel_rows,
    multilabel_section_html,
    multilabel_summary_lines,
    ordinal_rows,
    ordinal_section_html,
    ordinal_summary_lines,
    plot_confusion,
    plot_label_aucs,
    plot_ovr_roc,
)


def _est(value: float | None, lower: float | None = None, upper: float | None = None,
         method: str = "wilson") -> dict[str, Any]:
    return {"value": value, "lower": lower, "upper": upper, "se": None, "n": 90,
            "method": method}


def _ordinal() -> dict[str, Any]:
    return {
        "task": "ordinal", "status": "completed", "reason": "", "n": 90,
        "sites": ["north", "<script>x</script>"], "classes": 3, "noised": False,
        "suppressed_cells": 2, "metrics_note": "2 small confusion cell(s) were suppressed",
        "ordinal": {
            "kappa_quadratic": _est(0.6125, 0.5, 0.725, "fleiss-cohen-everitt"),
            "kappa_linear": _est(0.5, 0.4, 0.6, "fleiss-cohen-everitt"),
            "mae": _est(0.4, 0.3, 0.5, "t"),
            "accuracy": _est(0.65, 0.55, 0.74), "balanced_accuracy": _est(0.6, 0.5, 0.7),
            "confusion": [[20, 5, 0], [6, 25, 4], [0, 7, 23]],
            "class_counts": [25, 35, 30],
            "sensitivity": [_est(0.8), _est(0.714), _est(0.767)],
            "precision": [_est(0.769), _est(0.676), _est(None)],
            "per_site": [{"site": "north", "n": 50, "kappa_quadratic": 0.7, "accuracy": 0.7},
                         {"site": "<script>x</script>", "n": 40, "kappa_quadratic": None,
                          "accuracy": 0.6}]}}


def _multilabel(with_roc: bool = True) -> dict[str, Any]:
    ml: dict[str, Any] = {
        "positives": [30, 12], "prevalence": [0.3, 0.12],
        "sensitivity": [_est(0.7, 0.6, 0.8), _est(0.5, 0.3, 0.7)],
        "specificity": [_est(0.8, 0.7, 0.9), _est(0.9, 0.8, 0.95)],
        "auc": {"macro": _est(0.75, 0.7, 0.8, "delong-covariance"),
                "per_label": [_est(0.8, 0.72, 0.88, "delong"), _est(0.7, 0.55, 0.85, "delong")],
                "p_values": [0.0001, 0.01], "p_holm": [0.0002, 0.01]},
        "per_site": [{"site": "east & west", "n": 100, "positives": [30, 12],
                      "macro_auc": 0.75}]}
    if with_roc:
        ml["roc"] = [{"pos": [1, 2, 7], "neg": [6, 3, 1]}, {"pos": [2, 2, 1], "neg": [5, 3, 2]}]
    return {"task": "multilabel", "status": "completed", "reason": "", "n": 100, "labels": 2,
            "sites": ["east & west"], "auc_note": "", "metrics_note": "", "multilabel": ml}


def _images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def _expanded(pos: list[int], neg: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and bin-index scores of the patients counted in two histograms."""
    scores = np.concatenate([np.repeat(np.arange(len(pos)), pos),
                             np.repeat(np.arange(len(neg)), neg)])
    return np.r_[np.ones(sum(pos)), np.zeros(sum(neg))], scores


def test_ordinal_section_shows_kappa_notes_plot_grades_and_escaped_sites() -> None:
    # Execute
    page = ordinal_section_html(_ordinal())
    # Assert
    assert "<strong>0.613 (95% CI 0.5&ndash;0.725)</strong> on 90 test patients" in page
    assert "from 2 hospitals" in page and "suppressed" in page
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt;" in page
    images = _images(page)
    assert len(images) == 1 and images[0].startswith(b"\x89PNG")
    assert page.count("<tr><td>") == 3 + 2  # one row per grade, one per hospital
    assert "P(grade &gt; k)" in page


def test_a_failed_section_says_why_without_plots() -> None:
    # Prepare
    section = {"status": "failed", "reason": "no node answered the <ordinal-metrics> query"}
    # Execute
    page = ordinal_section_html(section)
    # Assert
    assert _images(page) == [] and "&lt;ordinal-metrics&gt;" in page
    assert ordinal_summary_lines(section) == [
        "ordinal inference failed: no node answered the <ordinal-metrics> query"]
    assert ordinal_rows(section)[0][0] == "status"
    assert multilabel_section_html({}).startswith('<p class="note">No pooled multi-label')


def test_ordinal_summary_and_rows_give_the_estimates_as_text() -> None:
    # Execute
    lines = ordinal_summary_lines(_ordinal())
    rows = dict(ordinal_rows(_ordinal()))
    # Assert
    assert lines[0] == "test quadratic-weighted kappa: 0.613 (95% CI 0.500-0.725)"
    assert "test mean absolute grade error: 0.400 (95% CI 0.300-0.500)" in lines
    assert rows["patients"] == "90" and rows["accuracy (exact grade)"].startswith("0.650")


def test_multilabel_section_table_plots_and_escaping() -> None:
    # Execute
    page = multilabel_section_html(_multilabel())
    plain = multilabel_section_html(_multilabel(with_roc=False))
    # Assert: macro headline, one row per finding with Holm p, forest and ROC plots
    assert "<strong>0.75 (95% CI 0.7&ndash;0.8)</strong>" in page
    assert "over 2 findings" in page and "Holm-adjusted" in page
    assert "<td>0.0002</td>" in page and "<td>0.01</td>" in page
    assert "east &amp; west" in page and "east & west" not in page
    assert len(_images(page)) == 2 and len(_images(plain)) == 1


def test_multilabel_summary_and_rows_list_every_finding() -> None:
    # Execute
    lines = multilabel_summary_lines(_multilabel())
    rows = multilabel_rows(_multilabel())
    # Assert
    assert lines == ["test macro AUC: 0.750 (95% CI 0.700-0.800)",
                     "test finding 0 AUC: 0.800 (95% CI 0.720-0.880); prevalence 0.300, "
                     "Holm p 0.0002",
                     "test finding 1 AUC: 0.700 (95% CI 0.550-0.850); prevalence 0.120, "
                     "Holm p 0.01"]
    assert rows[0] == ("patients", "100")


def test_multiclass_plots_draw_the_confusion_and_roc_only_with_histograms() -> None:
    # Prepare
    confusion = [[5, 1, 0], [2, 6, 1], [0, 1, 7]]
    pos = [[1, 2, 3], [0, 4, 5], [2, 2, 4]]
    neg = [[9, 4, 3], [8, 5, 4], [6, 6, 5]]
    with_hists = {"multiclass": {"confusion": confusion,
                                 "histograms": {"positive": pos, "negative": neg}}}
    # Execute / Assert
    assert len(_images(multiclass_plots_html({"multiclass": {"confusion": confusion}}))) == 1
    assert len(_images(multiclass_plots_html(with_hists))) == 2
    assert multiclass_plots_html({"multiclass": {}}) == ""


def test_the_confusion_heat_map_prints_every_count() -> None:
    # Prepare
    confusion = [[5, 1, 0], [2, 6, 1], [0, 1, 7]]
    # Execute
    fig = plot_confusion(confusion, title="t", true_label="true", predicted_label="pred")
    # Assert: one text per cell, row-major, and colours by share of the row
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == [str(v) for row in confusion for v in row]
    shares = fig.axes[0].images[0].get_array()
    np.testing.assert_allclose(shares[1], np.array([2, 6, 1]) / 9)


def test_roc_curves_are_labelled_with_the_sklearn_auc_of_the_histograms() -> None:
    # Prepare
    curves = [("a", [1, 2, 7], [6, 3, 1]), ("b", [2, 2, 1], [5, 3, 2])]
    # Execute
    fig = plot_ovr_roc(curves, title="ROC")
    # Assert
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    for (name, pos, neg), text in zip(curves, labels, strict=True):
        y, s = _expanded(pos, neg)
        assert text == f"{name} (AUC {roc_auc_score(y, s):.3f})"


def test_the_auc_forest_plots_each_finding_and_the_macro() -> None:
    # Execute
    ml = _multilabel()["multilabel"]["auc"]
    fig = plot_label_aucs(["f0", "f1"], ml["per_label"], ml["macro"], title="AUC")
    # Assert: the tick labels bottom-up and each marker at its AUC
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["macro", "f1", "f0"]
    markers = [line.get_xdata()[0] for line in ax.get_lines() if len(line.get_xdata()) == 1]
    assert markers == pytest.approx([0.75, 0.7, 0.8])
