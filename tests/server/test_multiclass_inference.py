"""Pooled multi-class inference against scikit-learn and statsmodels on the pooled patients.

Nodes are served in-process by the real ClientApp (``InProcessGrid``); reference values come
from scikit-learn (confusion matrix, accuracy, balanced accuracy, recall, precision, one-vs-rest
AUC on the binned scores), statsmodels (Wilson intervals) and DeLong's variance computed
directly from the pooled binned scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)
from statsmodels.stats.proportion import proportion_confint

from common import messages as k
from common.stats.bins import fine_score_edges, score_bin_index
from server.inference_multiclass import multiclass_inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.server.multiclass_federation import (
    PLAN,
    multiclass_arrays,
    multiclass_nodes,
    reference_probabilities,
)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mcfed")


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))


def _pooled(nodes: dict, arrays: object, split: str) -> tuple[np.ndarray, np.ndarray]:
    parts = [reference_probabilities(n, arrays, split) for n in nodes.values()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _delong_se(pos: np.ndarray, neg: np.ndarray) -> float:
    """DeLong's standard error of the AUC of positive vs negative (tied) scores."""
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    return float(np.sqrt(v10.var(ddof=1) / pos.size + v01.var(ddof=1) / neg.size))


def _value(est: dict) -> float:
    return float("nan") if est["value"] is None else est["value"]


def test_pooled_multiclass_metrics_equal_sklearn_on_the_pooled_patients(root: Path) -> None:
    # Prepare
    nodes = multiclass_nodes(root)
    arrays = multiclass_arrays(0)
    probs, y = _pooled(nodes, arrays, k.SPLIT_TEST)
    pred = probs.argmax(axis=1)
    # Execute
    sec = multiclass_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: the confusion-matrix metrics ...
    assert sec["status"] == "completed" and sec["failures"] == [] and sec["task"] == "multiclass"
    assert sec["decision"] == "argmax" and sec["suppressed_cells"] == 0 and not sec["noised"]
    mc = sec["multiclass"]
    assert sec["n"] == y.size and mc["class_counts"] == np.bincount(y, minlength=3).tolist()
    assert mc["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert mc["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    lo, hi = proportion_confint(int((pred == y).sum()), y.size, method="wilson")
    assert (mc["accuracy"]["lower"], mc["accuracy"]["upper"]) == pytest.approx((lo, hi))
    assert mc["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    recall = recall_score(y, pred, labels=[0, 1, 2], average=None, zero_division=np.nan)
    precision = precision_score(y, pred, labels=[0, 1, 2], average=None, zero_division=np.nan)
    np.testing.assert_allclose([_value(e) for e in mc["sensitivity"]], recall)
    np.testing.assert_allclose([_value(e) for e in mc["precision"]], precision)
    # ... and the one-vs-rest AUCs on the binned scores, with DeLong's standard errors.
    binned = np.stack([score_bin_index(probs[:, c], fine_score_edges()) for c in range(3)], 1)
    aucs = [roc_auc_score(y == c, binned[:, c]) for c in range(3)]
    per_class = mc["auc"]["per_class"]
    np.testing.assert_allclose([e["value"] for e in per_class], aucs, atol=1e-12)
    np.testing.assert_allclose(
        [e["se"] for e in per_class],
        [_delong_se(binned[y == c, c], binned[y != c, c]) for c in range(3)], rtol=1e-9)
    assert mc["auc"]["macro"]["value"] == pytest.approx(np.mean(aucs), abs=1e-12)
    macro = mc["auc"]["macro"]
    assert macro["lower"] < macro["value"] < macro["upper"]
    sites = [reference_probabilities(n, arrays, k.SPLIT_TEST) for n in nodes.values()]
    assert [row["site"] for row in mc["per_site"]] == ["m1", "m2"]
    for row, (p_site, y_site) in zip(mc["per_site"], sites, strict=True):
        assert row["n"] == y_site.size
        assert row["accuracy"] == pytest.approx(accuracy_score(y_site, p_site.argmax(axis=1)))
        if len(np.unique(y_site)) == 3:
            b = np.stack([score_bin_index(p_site[:, c], fine_score_edges()) for c in range(3)], 1)
            assert row["macro_auc"] == pytest.approx(
                np.mean([roc_auc_score(y_site == c, b[:, c]) for c in range(3)]), abs=1e-12)
    assert mc["mean_loglik"] == pytest.approx(
        np.mean(np.log(np.clip(probs[np.arange(y.size), y], 1e-7, 1))))


def test_small_cells_are_suppressed_and_small_classes_refuse_placements(root: Path) -> None:
    # Prepare: hospitals that suppress cells of 1..4 patients (their classes hold fewer)
    nodes = multiclass_nodes(root, min_release_count=5)
    grid = InProcessGrid(nodes)
    # Execute
    sec = multiclass_inference(grid, list(nodes), multiclass_arrays(1), PLAN, timeout=5)
    # Assert: every released confusion cell is 0 or >= 5, and the report says cells went ...
    released = [np.asarray(r.content[k.METRICS][k.CONFUSION]) for r in grid.replies
                if not r.has_error() and k.CONFUSION in r.content[k.METRICS]]
    assert len(released) == 2 and all(np.all((c == 0) | (c >= 5)) for c in released)
    assert sec["status"] == "completed" and sec["suppressed_cells"] > 0
    assert "suppressed" in sec["metrics_note"]
    # ... and the placement sums were refused (a class under 5 patients): AUCs without CIs.
    assert {f["query"] for f in sec["failures"]} == {"multiclass-placements"}
    assert all("minimum release count" in f["reason"] for f in sec["failures"])
    assert sec["multiclass"]["auc"]["macro"]["method"] == "histogram"
    assert "DeLong CIs unavailable" in sec["auc_note"]


def test_binary_queries_refuse_a_multiclass_plan_and_vice_versa(root: Path) -> None:
    # Prepare
    from server.inference import pooled_metrics

    nodes = multiclass_nodes(root)
    arrays = multiclass_arrays(0)
    # Execute
    sec = pooled_metrics(InProcessGrid(nodes), list(nodes), arrays, PLAN, split=k.SPLIT_TEST,
                         timeout=5)
    # Assert: a refusal naming the task, nothing released
    assert sec["status"] == "failed"
    assert all("multiclass" in f["reason"] for f in sec["failures"])


def test_every_multiclass_release_reaches_the_ledger(root: Path, tmp_path: Path) -> None:
    # Prepare
    from client.app import _load
    from client.privacy_guard import NodeBudget

    nodes = multiclass_nodes(root, ledger_dir=tmp_path / "ledger")
    # Execute
    sec = multiclass_inference(InProcessGrid(nodes), list(nodes), multiclass_arrays(0), PLAN,
                               timeout=5)
    # Assert: both queries of each node are on its ledger's record (exact level)
    assert sec["status"] == "completed"
    for node in nodes.values():
        ledger = NodeBudget.for_node(node).ledger
        releases = [e.release for e in ledger.entries(_load(node, PLAN).fingerprint,
                                                      level="exact")]
        assert releases == ["query:multiclass-metrics", "query:multiclass-placements"]


def test_noised_multiclass_releases_are_charged_and_still_pooled(root: Path,
                                                                 tmp_path: Path) -> None:
    # Prepare: hospitals that noise every statistic (and charge it to their ledgers)
    from client.app import _load
    from client.privacy_guard import NodeBudget

    nodes = multiclass_nodes(root, stats_noise_multiplier=2.0, epsilon_cap=50.0,
                             ledger_dir=tmp_path / "ledger")
    # Execute
    sec = multiclass_inference(InProcessGrid(nodes), list(nodes), multiclass_arrays(0), PLAN,
                               timeout=5)
    # Assert
    assert sec["status"] == "completed" and sec["noised"] and sec["suppressed_cells"] == 0
    assert sum(map(sum, sec["multiclass"]["confusion"])) > 0
    for node in nodes.values():
        charged = NodeBudget.for_node(node).ledger.entries(_load(node, PLAN).fingerprint)
        assert [e.release for e in charged][:1] == ["query:multiclass-metrics"]


def test_a_fully_suppressed_confusion_matrix_says_what_to_do(root: Path) -> None:
    # Prepare: a minimum release count (12) below each hospital's test patients (14-16) but
    # above every confusion cell, so every released cell is suppressed
    nodes = multiclass_nodes(root / "all-suppressed", min_release_count=12)
    # Execute
    sec = multiclass_inference(InProcessGrid(nodes), list(nodes), multiclass_arrays(1), PLAN,
                               timeout=5)
    # Assert: a failed section that names the cause and the fix, not "matrix is empty"
    assert sec["status"] == "failed" and sec["suppressed_cells"] > 0
    assert "minimum release count and was suppressed" in sec["reason"]
    assert "--min-release-count" in sec["reason"] and "empty" not in sec["reason"]
