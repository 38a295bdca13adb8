"""Pooled ordinal inference against scikit-learn and statsmodels on the pooled patients.

Three hand-made hospitals (:mod:`tests.server.task_class_federation`) are served in-process by
the real ClientApp; reference values come from scikit-learn (weighted kappa, confusion matrix,
accuracy, balanced accuracy, recall, precision), statsmodels (the Fleiss-Cohen-Everitt
variance of the weighted kappa, Wilson intervals, the t interval of the mean grade error).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_score,
    recall_score,
)
from statsmodels.stats.inter_rater import cohens_kappa
from statsmodels.stats.proportion import proportion_confint
from statsmodels.stats.weightstats import DescrStatsW

from common import messages as k
from common.config import TrainPlan
from common.stats.multiclass import ConfusionMatrix
from common.stats.ordinal import weighted_kappa
from server.inference_ordinal import ordinal_inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.server.task_class_federation import (
    make_nodes,
    make_split,
    task_queries,  # noqa: F401  (fixture)
    model_arrays,
    reference_outputs,
    serve_splits,
)

PLAN = TrainPlan(task="ordinal", num_classes=4, image_size=8, model="mlp", run_id="t-ord")
GRADES = [0, 1, 2, 3]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_queries: None) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))


@pytest.fixture
def splits(monkeypatch: pytest.MonkeyPatch) -> dict:
    rng = np.random.default_rng(11)
    out = {f"s{i}": make_split(rng, rng.integers(0, 4, size=n))
           for i, n in ((1, 45), (2, 60), (3, 38))}
    serve_splits(monkeypatch, out)
    return out


def _grades(splits: dict, arrays: object) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per site: (true grades, predicted grades) of its patients, computed directly."""
    out = {}
    for site, split in splits.items():
        exceed, grades = reference_outputs(PLAN, arrays, split)
        out[site] = (grades.reshape(-1), (exceed >= 0.5).sum(axis=1))
    return out


def test_predicted_grade_counts_thresholds_at_or_above_one_half() -> None:
    # Prepare: monotone, non-monotone and boundary probabilities P(grade > k)
    from client.queries.ordinal import predicted_grades

    exceed = np.array([[0.9, 0.6, 0.2], [0.4, 0.7, 0.1], [0.5, 0.5, 0.49], [0.1, 0.0, 0.0]])
    # Execute / Assert
    assert predicted_grades(exceed).tolist() == [2, 1, 2, 0]


def test_pooled_ordinal_metrics_equal_sklearn_on_the_pooled_patients(
        tmp_path: Path, splits: dict) -> None:
    # Prepare
    nodes = make_nodes(tmp_path)
    arrays = model_arrays(PLAN, 3, scale=3.0)
    per_site = _grades(splits, arrays)
    y = np.concatenate([t for t, _ in per_site.values()])
    pred = np.concatenate([p for _, p in per_site.values()])
    assert len(np.unique(pred)) >= 2 and len(np.unique(y)) == 4  # a non-degenerate case
    # Execute
    sec = ordinal_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: the section ...
    assert sec["status"] == "completed" and sec["failures"] == [] and sec["task"] == "ordinal"
    assert sec["n"] == y.size == 45 + 60 + 38 and sec["sites"] == ["s1", "s2", "s3"]
    assert sec["suppressed_cells"] == 0 and not sec["noised"] and sec["metrics_note"] == ""
    od = sec["ordinal"]
    cm = confusion_matrix(y, pred, labels=GRADES)
    assert od["confusion"] == cm.tolist()
    assert od["class_counts"] == np.bincount(y, minlength=4).tolist()
    # ... weighted kappas against scikit-learn, their variance against statsmodels ...
    for weights in ("quadratic", "linear"):
        est = od[f"kappa_{weights}"]
        assert est["value"] == pytest.approx(cohen_kappa_score(y, pred, weights=weights),
                                             abs=1e-12)
        ref = cohens_kappa(cm, wt=weights)
        assert est["se"] ** 2 == pytest.approx(ref.var_kappa, rel=1e-9)
        half = 1.959963984540054 * np.sqrt(ref.var_kappa)
        assert (est["lower"], est["upper"]) == pytest.approx(
            (max(-1.0, ref.kappa - half), min(1.0, ref.kappa + half)), rel=1e-9)
    # ... mean absolute grade error with its t interval ...
    err = DescrStatsW(np.abs(y - pred).astype(float))
    assert od["mae"]["value"] == pytest.approx(err.mean)
    assert (od["mae"]["lower"], od["mae"]["upper"]) == pytest.approx(err.tconfint_mean())
    # ... and the confusion metrics.
    assert od["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    lo, hi = proportion_confint(int((pred == y).sum()), y.size, method="wilson")
    assert (od["accuracy"]["lower"], od["accuracy"]["upper"]) == pytest.approx((lo, hi))
    assert od["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    recall = recall_score(y, pred, labels=GRADES, average=None, zero_division=np.nan)
    precision = precision_score(y, pred, labels=GRADES, average=None, zero_division=np.nan)
    np.testing.assert_allclose([np.nan if e["value"] is None else e["value"]
                                for e in od["sensitivity"]], recall)
    np.testing.assert_allclose([np.nan if e["value"] is None else e["value"]
                                for e in od["precision"]], precision)
    # Per site: patients, accuracy and quadratic kappa of its own patients.
    assert [row["site"] for row in od["per_site"]] == ["s1", "s2", "s3"]
    for row, (site, (t, p)) in zip(od["per_site"], per_site.items(), strict=True):
        assert row["site"] == site and row["n"] == t.size
        assert row["accuracy"] == pytest.approx(accuracy_score(t, p))
        assert row["kappa_quadratic"] == pytest.approx(
            cohen_kappa_score(t, p, weights="quadratic"), abs=1e-12)


def test_small_cells_are_suppressed_and_the_section_says_so(tmp_path: Path,
                                                            splits: dict) -> None:
    # Prepare: hospitals that release confusion cells of 1..4 patients as 0
    nodes = make_nodes(tmp_path, min_release_count=5)
    grid = InProcessGrid(nodes)
    # Execute
    sec = ordinal_inference(grid, list(nodes), model_arrays(PLAN, 3, scale=3.0), PLAN,
                            timeout=5)
    # Assert: every released cell is 0 or >= 5 and kappa is that of the suppressed sum
    released = [np.asarray(r.content[k.METRICS][k.CONFUSION]).reshape(4, 4)
                for r in grid.replies]
    assert len(released) == 3 and all(np.all((c == 0) | (c >= 5)) for c in released)
    assert sec["status"] == "completed" and sec["suppressed_cells"] > 0
    assert "suppressed" in sec["metrics_note"]
    pooled = sum(released)
    assert sec["ordinal"]["confusion"] == pooled.tolist()
    assert sec["ordinal"]["kappa_quadratic"]["value"] == pytest.approx(
        weighted_kappa(ConfusionMatrix(counts=pooled)).value, abs=1e-12)


def test_a_refusing_or_silent_node_is_reported_not_raised(tmp_path: Path,
                                                          splits: dict) -> None:
    # Prepare: s3 holds 38 patients, under its minimum release count of 40; s2 is silent
    nodes = make_nodes(tmp_path)
    ids = list(nodes)
    nodes[ids[2]] = make_nodes(tmp_path, min_release_count=40)[ids[2]]
    arrays = model_arrays(PLAN, 3, scale=3.0)
    # Execute
    sec = ordinal_inference(InProcessGrid(nodes, silent=[ids[1]]), ids, arrays, PLAN,
                            timeout=5)
    # Assert: s1 alone is pooled; both others are named in the failures
    t, p = _grades(splits, arrays)["s1"]
    assert sec["status"] == "completed" and sec["sites"] == ["s1"] and sec["n"] == t.size
    assert sec["ordinal"]["kappa_quadratic"]["value"] == pytest.approx(
        cohen_kappa_score(t, p, weights="quadratic"), abs=1e-12)
    reasons = {f["node_id"]: f["reason"] for f in sec["failures"]}
    assert reasons[ids[1]] == "no reply within the timeout"
    assert "minimum release count" in reasons[ids[2]]


def test_no_answer_gives_a_failed_section_with_a_reason(tmp_path: Path, splits: dict) -> None:
    # Prepare: a multiclass plan sent to the ordinal query: every node refuses
    plan = TrainPlan(task="multiclass", num_classes=4, image_size=8, model="mlp", run_id="t")
    nodes = make_nodes(tmp_path)
    # Execute
    sec = ordinal_inference(InProcessGrid(nodes), list(nodes), model_arrays(plan, 0), plan,
                            timeout=5)
    # Assert
    assert sec["status"] == "failed" and "no node answered" in sec["reason"]
    assert len(sec["failures"]) == 3
    assert all("serves the ordinal task" in f["reason"] for f in sec["failures"])
    assert "ordinal" not in sec


def test_ordinal_releases_reach_the_ledger_exact_or_noised(tmp_path: Path,
                                                           splits: dict) -> None:
    # Prepare
    from client.privacy_guard import NodeBudget

    exact = make_nodes(tmp_path / "exact")
    noised = make_nodes(tmp_path / "noised", stats_noise_multiplier=2.0, epsilon_cap=50.0)
    arrays = model_arrays(PLAN, 3, scale=3.0)
    # Execute
    sec_exact = ordinal_inference(InProcessGrid(exact), list(exact), arrays, PLAN, timeout=5)
    sec_noised = ordinal_inference(InProcessGrid(noised), list(noised), arrays, PLAN,
                                   timeout=5)
    # Assert: one exact entry per node, one charged (patient-level) entry per noised node
    assert sec_exact["status"] == sec_noised["status"] == "completed"
    assert sec_noised["noised"] and not sec_exact["noised"]
    assert sum(map(sum, sec_noised["ordinal"]["confusion"])) > 0
    for node in exact.values():
        entries = NodeBudget.for_node(node).ledger.entries(f"fp-{node.site_name}",
                                                           level="exact")
        assert [e.release for e in entries] == ["query:ordinal-metrics"]
    for node in noised.values():
        entries = NodeBudget.for_node(node).ledger.entries(f"fp-{node.site_name}")
        assert [(e.release, e.level) for e in entries] == [("query:ordinal-metrics",
                                                            "patient")]


@pytest.mark.parametrize("drop", [{}, {33: "train"}])
def test_secure_aggregation_gives_the_plain_sections_numbers(
        tmp_path: Path, splits: dict, drop: dict[int, str]) -> None:
    from server.inference_secure import HIDDEN, secure_queries
    from tests.server.test_secure_inference import (
        StageGrid,
        _clear_per_site_values,
        assert_same_section,
    )

    nodes = make_nodes(tmp_path)
    arrays = model_arrays(PLAN, 3, scale=3.0)
    summed = [n for n in nodes if n not in drop]
    plain = ordinal_inference(InProcessGrid(nodes), summed, arrays, PLAN, timeout=5)
    grid = StageGrid(nodes, drop)
    with secure_queries(True, min_survivors=2):
        sec = ordinal_inference(grid, list(nodes), arrays, PLAN, timeout=5)
    assert sec["status"] == "completed" and [f["node_id"] for f in sec["failures"]] == list(drop)
    assert_same_section(sec, plain)
    assert sec["ordinal"]["per_site"] == HIDDEN and sec["secure_aggregation"]["covered"]
    assert _clear_per_site_values(grid) == []
    # the HTML report and the CLI view render the section, saying the rows are hidden
    from cli.report_view import print_inference
    from server.report_html import render_report_html

    text = render_report_html({"status": "completed", "inference": sec},
                              tmp_path / "report.html").read_text()
    assert "hidden by secure aggregation" in text
    print_inference(sec)
