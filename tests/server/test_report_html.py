"""report.html: one self-contained file with the inference figures and the CV table."""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np
import pytest

from common.errors import DataError
from common.stats import sum_stats
from common.stats.auc import auc_ci, delong_from_sums, node_placement_sums
from common.stats.bins import class_histograms, uniform_edges
from common.stats.calibration import (
    calibration_bin_sums,
    calibration_glm_stats,
    expected_calibration_error,
    fit_calibration,
    reliability_diagram,
)
from common.stats.glm import summing_stats_fn
from common.stats.meta import random_effects
from common.stats.metrics import classification_metrics, confusion_counts
from server.plots import cv_table_html, roc_from_histograms
from server.report_html import calibration_section, render_report_html, roc_section

EDGES = uniform_edges(200)


def _sites() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(0)
    sites = {}
    for name, shift in (("alpha", 1.0), ("beta", 1.5), ("gamma<script>", 2.0)):
        y = (rng.random(300) < 0.4).astype(int)
        s = 1 / (1 + np.exp(-(rng.normal(size=300) + shift * y - 0.8)))
        sites[name] = (s, y)
    return sites


def _inference() -> dict[str, object]:
    """An inference section built by the statistics library from three simulated sites."""
    sites = _sites()
    hists = {n: class_histograms(s, y, EDGES) for n, (s, y) in sites.items()}
    pooled = (sum(h[0] for h in hists.values()), sum(h[1] for h in hists.values()))
    sums = sum_stats([node_placement_sums([s], y, [pooled], edges=EDGES)
                      for s, y in sites.values()])
    auc, var = delong_from_sums(sums)
    per_site = []
    for n, (s, y) in sites.items():
        one = node_placement_sums([s], y, [hists[n]], edges=EDGES)
        per_site.append(tuple(delong_from_sums(one)))
    meta = random_effects([a for a, _ in per_site], [v for _, v in per_site],
                          site_names=list(sites))
    cal = sum_stats([calibration_bin_sums(s, y) for s, y in sites.values()])
    fn = summing_stats_fn([lambda b, s=s, y=y: calibration_glm_stats(s, y, b)
                           for s, y in sites.values()])
    counts = sum_stats([confusion_counts(s, y) for s, y in sites.values()])
    metrics = {k: v.as_dict() for k, v in classification_metrics(counts).items()}
    metrics["auc"] = auc_ci(auc, var, n=900).as_dict()
    return {
        "split": "test",
        "metrics": metrics,
        "roc": roc_section(pooled, hists),
        "calibration": calibration_section(cal, fit=fit_calibration(fn)),
        "meta": {"auc": meta.as_dict()},
        "cv": {"metric": "auc",
               "folds": [{"fold": i + 1, "auc": {"value": 0.7 + i / 100, "lower": 0.61234,
                                                 "upper": 0.79876}, "n": 180 + i}
                         for i in range(5)],
               "pooled": {"auc": {"value": 0.7421, "lower": 0.7012, "upper": 0.7833},
                          "n": 910}},
        "tests": {"mcnemar": {"statistic": 3.2, "pvalue": 0.074, "b": 20, "c": 9}},
    }


def test_report_html_is_self_contained_with_figures_and_cv_table(tmp_path: Path) -> None:
    # Prepare
    report: dict[str, object] = {"status": "completed", "run_id": "run-42",
                                 "inference": _inference()}
    # Execute
    out = render_report_html(report, tmp_path / "report.html")
    # Assert
    text = out.read_text(encoding="utf-8")
    assert out == tmp_path / "report.html"
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    assert len(images) == 3  # ROC, calibration, forest
    assert all(base64.b64decode(img)[:8] == b"\x89PNG\r\n\x1a\n" for img in images)
    for value in ("0.7421", "0.7012", "0.7833", "0.6123", "0.7988", "184", "910"):
        assert value in text
    assert "http:" not in text and "https:" not in text and "href=" not in text
    assert "<script>" not in text and "gamma&lt;script&gt;" in text  # escaped site name
    assert "<link" not in text and "@import" not in text
    assert "mcnemar" in text.lower() and "0.074" in text
    ece = report["inference"]["calibration"]["ece"]  # type: ignore[index]
    assert ece == pytest.approx(expected_calibration_error(
        sum_stats([calibration_bin_sums(s, y) for s, y in _sites().values()])))
    assert f"{ece:.4g}" in text and "slope" in text
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left behind


def test_report_without_inference_and_with_broken_part(tmp_path: Path) -> None:
    out = render_report_html({"status": "failed"}, tmp_path / "r.html")
    assert "no inference section" in out.read_text(encoding="utf-8")
    broken = {"inference": {"roc": {"pooled": {"pos": [1, 2], "neg": [0, 0]}},
                            "cv": {"folds": [{"fold": 1, "auc": 0.5}]}}}
    text = render_report_html(broken, tmp_path / "r.html").read_text(encoding="utf-8")
    assert "ROC curves could not be rendered" in text
    assert "<td>1</td><td>0.5</td>" in text


def test_roc_skips_one_class_sites_and_collapses_many() -> None:
    from server.plots import ROC_LABELLED_SITES, plot_roc

    good = {"pos": [0, 1, 3], "neg": [2, 1, 0]}
    one_class = {"pos": [0, 1, 1], "neg": [0, 0, 0]}
    # A site whose test patients are all positive used to take the whole figure down
    fig = plot_roc({"pooled": good, "sites": {"site-1": good, "site-2": one_class}})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("site-1 (AUC ") and labels[-1].startswith("pooled (AUC ")
    assert "1 site(s) with one class only: no curve" in labels
    assert not any(label.startswith("site-2") for label in labels)
    # Many hospitals: one legend entry for their curves, each still drawn
    many = {f"site-{i}": good for i in range(ROC_LABELLED_SITES + 5)}
    fig = plot_roc({"pooled": good, "sites": many})
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == [f"{ROC_LABELLED_SITES + 5} sites, one line each", "pooled (AUC 0.958)"]
    assert len(fig.axes[0].lines) == ROC_LABELLED_SITES + 5 + 2  # sites, pooled, chance


def test_roc_points_and_cv_table() -> None:
    fpr, tpr = roc_from_histograms([0, 1, 3], [2, 1, 0])
    np.testing.assert_allclose(tpr, [0, 0.75, 1.0, 1.0])
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1.0])
    with pytest.raises(DataError):
        roc_from_histograms([1, 2], [1])
    table = cv_table_html({"folds": [{"fold": 1, "auc": {"value": 0.8, "lower": 0.7,
                                                         "upper": 0.9}}]})
    assert "<td>0.8 [0.7, 0.9]</td>" in table


def test_coordinator_shaped_sections_render(tmp_path: Path) -> None:
    # Prepare: the shape of the coordinator's pooled-metrics output (auc at top level,
    # calibration.bins, meta_<name> results, lists of per-site rows) and of a CV report.
    inf = _inference()
    sites = _sites()
    cal = sum_stats([calibration_bin_sums(s, y) for s, y in sites.values()])
    shaped = {
        "split": "test", "threshold": 0.5, "n": 900, "auc": inf["metrics"]["auc"],  # type: ignore[index]
        "metrics": {k: v for k, v in inf["metrics"].items() if k != "auc"},  # type: ignore[attr-defined]
        "calibration": {"bins": reliability_diagram(cal), "ece": 0.0421, "brier": 0.19},
        "meta_auc": inf["meta"]["auc"],  # type: ignore[index]
        "meta_sensitivity": random_effects([1.0, 1.4, 0.7], [0.05, 0.04, 0.08], scale="logit",
                                           site_names=["a", "b", "c"]).as_dict(),
        "auc_sites": [{"site": "alpha", "auc": 0.7512, "n_pos": 120}],
        "failures": [{"node_id": 7, "reason": "timeout"}],
        "roc": {},
        "cv": {"metric": "auc", "mode": "kfold",
               "folds": [{"fold": 1, "held_out": "fold 1", "auc": None,
                          "epsilon_by_site": {"alpha": 1.25, "beta": 2.5}}],
               "pooled": {"held_out": "all folds", "auc": None},
               "fold_details": [{"fold": 1, "reason": "a node refused", "errors": []}]},
    }
    # Execute
    text = render_report_html({"status": "completed", "inference": shaped},
                              tmp_path / "r.html").read_text(encoding="utf-8")
    # Assert: calibration plot + two forest plots (no ROC: the roc part is empty)
    assert text.count('<img src="data:image/png;base64,') == 3
    for snippet in ("0.0421", "0.7512", "timeout", "alpha: 1.25", "a node refused",
                    "Sensitivity by hospital", "k-fold"):
        assert snippet in text
    assert text.index("<td>AUC (area under the ROC curve)</td>") < text.index(
        "<td>Accuracy</td>")
    assert "could not be rendered" not in text
