"""Coordinator-side pooled inference against the same computation on the pooled patients.

Nodes are served in-process by the real ClientApp (``InProcessGrid``); reference values come
from scikit-learn, statsmodels and a direct DeLong on the pooled per-patient scores.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, roc_auc_score
from statsmodels.stats.contingency_tables import mcnemar
from statsmodels.stats.proportion import proportion_confint

from common import messages as k
from common.config import NodeConfig
from common.stats.conformal import coverage_counts
from common.stats.uncertainty import predictive_entropy
from server import inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import PLAN, image_nodes, model_arrays, reference_scores


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed")


def _pooled(
    nodes: dict[int, NodeConfig], arrays: ArrayRecord, split: str
) -> tuple[np.ndarray, np.ndarray]:
    parts = [reference_scores(n, arrays, split) for n in nodes.values()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _delong(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Direct DeLong (1988): AUCs and covariance of M models from raw pooled scores (M, n)."""
    y = labels.astype(bool)
    x_, y_ = scores[:, y], scores[:, ~y]
    v10 = ((x_[:, :, None] > y_[:, None, :]) + 0.5 * (x_[:, :, None] == y_[:, None, :])).mean(2)
    v01 = ((x_[:, :, None] > y_[:, None, :]) + 0.5 * (x_[:, :, None] == y_[:, None, :])).mean(1)
    cov = np.atleast_2d(np.cov(v10)) / y.sum() + np.atleast_2d(np.cov(v01)) / (~y).sum()
    return v10.mean(1), cov


def test_pooled_metrics_equal_pooled_computation(root: Path) -> None:
    nodes = image_nodes(root)
    a = model_arrays(0)
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), a, PLAN,
                                   split=k.SPLIT_TEST, timeout=5, threshold=0.99)
    s, y = _pooled(nodes, a, k.SPLIT_TEST)
    assert res["status"] == "completed" and res["failures"] == [] and res["n"] == s.size
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.99).astype(int), labels=[0, 1]).ravel()
    assert res["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    lo, hi = proportion_confint(tp + tn, s.size, alpha=0.05, method="wilson")
    acc = res["metrics"]["accuracy"]
    assert acc["value"] == pytest.approx((tp + tn) / s.size)
    assert (acc["lower"], acc["upper"]) == pytest.approx((lo, hi), abs=1e-12)
    auc = res["metrics"]["auc"]
    assert abs(auc["value"] - roc_auc_score(y, s)) <= 1e-4 and auc["method"] == "delong"
    _, cov = _delong(s[None, :], y)
    assert auc["se"] == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-6)
    assert res["metrics"]["brier"] == pytest.approx(brier_score_loss(y, s), rel=1e-12)
    assert res["calibration"]["brier"] == res["metrics"]["brier"]
    assert res["loglik"] == pytest.approx(-log_loss(y, s, normalize=False), rel=1e-9)
    counts = np.histogram(s, bins=np.linspace(0, 1, 11))[0]
    assert res["calibration"]["count"] == counts.tolist()
    assert res["roc"]["pooled"]["pos"] and set(res["roc"]["sites"]) == {"h1", "h2"}
    for row, node in zip(res["auc_sites"], nodes.values(), strict=True):
        ss, yy = reference_scores(node, a, k.SPLIT_TEST)
        assert row["auc"] == pytest.approx(roc_auc_score(yy, ss), abs=1e-4)
        if row["var"] is not None:
            assert row["var"] == pytest.approx(_delong(ss[None, :], yy)[1][0, 0], rel=1e-6)


def test_a_hospital_with_one_class_keeps_the_pooled_delong_ci(root: Path, tmp_path: Path
                                                               ) -> None:
    # Prepare: a third hospital whose patients are all positive (found at 100 small
    # simulated hospitals: each such node refused its placement sums, so the pooled AUC lost
    # its DeLong interval)
    nodes = image_nodes(root)
    site = tmp_path / "site-3"
    shutil.copytree(root / "site-2", site)
    header, *rows = (site / "labels.csv").read_text().splitlines()
    (site / "labels.csv").write_text("\n".join([header, *(r.rsplit(",", 1)[0] + ",1"
                                                         for r in rows)]) + "\n")
    nodes[13] = NodeConfig(data_dir=site, site_name="h3", release_histograms=True,
                           min_release_count=1, device="cpu")
    a = model_arrays(0)
    # Execute
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), a, PLAN,
                                   split=k.SPLIT_TEST, timeout=5, threshold=0.99)
    # Assert: every node answered, and the interval is the pooled DeLong one
    s, y = _pooled(nodes, a, k.SPLIT_TEST)
    _, y3 = reference_scores(nodes[13], a, k.SPLIT_TEST)
    assert y3.min() == 1 and y3.size > 0  # the hospital really has one class
    assert res["failures"] == [] and res["n"] == s.size
    auc = res["metrics"]["auc"]
    assert auc["method"] == "delong" and abs(auc["value"] - roc_auc_score(y, s)) <= 1e-4
    assert auc["se"] == pytest.approx(math.sqrt(_delong(s[None, :], y)[1][0, 0]), rel=1e-6)
    (row,) = [r for r in res["auc_sites"] if r["site"] == "h3"]
    assert row["n_neg"] == 0 and row["var"] is None


def test_silent_node_is_listed_and_the_rest_is_pooled(root: Path) -> None:
    nodes = image_nodes(root)
    a = model_arrays(0)
    res = inference.pooled_metrics(InProcessGrid(nodes, silent=[12]), list(nodes), a, PLAN,
                                   split=k.SPLIT_TEST, timeout=5)
    assert [f["node_id"] for f in res["failures"]] == [12]
    assert "timeout" in res["failures"][0]["reason"] and res["sites"] == ["h1"]
    s, _ = reference_scores(nodes[11], a, k.SPLIT_TEST)
    assert res["n"] == s.size
    none = inference.pooled_metrics(InProcessGrid(nodes, silent=[11, 12]), list(nodes), a, PLAN,
                                    split=k.SPLIT_TEST, timeout=5)
    assert none["status"] == "failed" and len(none["failures"]) == 2


def test_no_histogram_consent_gives_metrics_without_auc(root: Path) -> None:
    nodes = image_nodes(root, release_histograms=False)
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), model_arrays(0), PLAN,
                                   split=k.SPLIT_TEST, timeout=5)
    assert res["status"] == "completed" and "auc" not in res["metrics"]
    assert "release-histograms" in res["auc_note"] and res["metrics"]["accuracy"]["n"] > 0


def test_paired_delong_and_mcnemar_equal_pooled_computation(root: Path) -> None:
    nodes = image_nodes(root)
    a, b = model_arrays(0), model_arrays(1)
    res = inference.paired_comparison(InProcessGrid(nodes), list(nodes), a, b, PLAN,
                                      split=k.SPLIT_TEST, timeout=5, threshold=0.99)
    sa, y = _pooled(nodes, a, k.SPLIT_TEST)
    sb, _ = _pooled(nodes, b, k.SPLIT_TEST)
    aucs, cov = _delong(np.vstack([sa, sb]), y)
    d = res["delong"]
    assert (d["auc_a"], d["auc_b"]) == pytest.approx(tuple(aucs), abs=1e-12)
    assert d["se"] == pytest.approx(math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), rel=1e-6)
    ra, rb = (sa >= 0.99) == y.astype(bool), (sb >= 0.99) == y.astype(bool)
    table = [[int(np.sum(ra & rb)), int(np.sum(ra & ~rb))],
             [int(np.sum(~ra & rb)), int(np.sum(~ra & ~rb))]]
    m = res["mcnemar"]
    assert (m["b"], m["c"]) == (table[0][1], table[1][0])
    assert m["exact"]["p"] == pytest.approx(mcnemar(table, exact=True).pvalue, rel=1e-9)
    assert m["chi2"]["p"] == pytest.approx(
        mcnemar(table, exact=False, correction=True).pvalue, rel=1e-9)


def test_conformal_and_entropy_equal_pooled_computation(root: Path) -> None:
    nodes = image_nodes(root)
    a, b = model_arrays(0), model_arrays(1)
    grid = InProcessGrid(nodes)
    res = inference.conformal_prediction(grid, list(nodes), a, PLAN, timeout=5, alpha=0.2)
    sc, yc = _pooled(nodes, a, k.SPLIT_VAL)
    noncon = np.sort(np.where(yc == 1, 1 - sc, sc))
    kth = math.ceil((sc.size + 1) * 0.8)
    assert noncon[kth - 1] <= res["qhat"] <= noncon[kth - 1] + 1e-4 + 1e-12
    st, yt = _pooled(nodes, a, k.SPLIT_TEST)
    direct = coverage_counts(st, yt, res["qhat"])
    assert res["coverage"]["value"] == pytest.approx(direct["covered"] / direct["n"])
    ent = inference.predictive_entropy_summary(grid, list(nodes), PLAN, split=k.SPLIT_TEST,
                                               timeout=5, ensemble=[a, b])
    sb, _ = _pooled(nodes, b, k.SPLIT_TEST)
    h = predictive_entropy(np.vstack([st, sb]))
    assert ent["pooled"]["n"] == h.size
    assert ent["pooled"]["mean"] == pytest.approx(h.mean(), rel=1e-9)
    assert ent["pooled"]["sd"] == pytest.approx(h.std(ddof=1), rel=1e-6)


def test_noised_nodes_complete_and_are_charged(root: Path, tmp_path: Path) -> None:
    from client.privacy_guard import NodeBudget

    nodes = image_nodes(root, stats_noise_multiplier=1.0, epsilon_cap=1e6,
                        ledger_dir=tmp_path)
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), model_arrays(0), PLAN,
                                   split=k.SPLIT_TEST, timeout=5)
    assert res["status"] == "completed" and res["noised"] and res["failures"] == []
    assert 0.0 <= res["metrics"]["auc"]["value"] <= 1.0
    from client.app import _load

    for node in nodes.values():
        entries = NodeBudget.for_node(node).ledger.entries(_load(node, PLAN).fingerprint)
        assert [e.release for e in entries] == ["query:metrics", "query:placements"]
        assert all(e.run_id == PLAN.run_id and e.mechanism.kind == "gaussian" for e in entries)


def test_calibration_slope_equals_pooled_statsmodels(root: Path) -> None:
    import statsmodels.api as sm

    nodes = image_nodes(root)
    a = model_arrays(2)
    res = inference.calibration_regression(InProcessGrid(nodes), list(nodes), a, PLAN,
                                           split=k.SPLIT_TEST, timeout=5)
    s, y = _pooled(nodes, a, k.SPLIT_TEST)
    p = np.clip(s, 1e-12, 1 - 1e-12)
    ref = sm.Logit(y, np.column_stack([np.ones(s.size), np.log(p / (1 - p))])).fit(
        method="newton", tol=1e-12, disp=0)
    assert res["status"] == "completed", res["reason"]
    coef = [c["coef"] for c in res["fit"]["coefficients"]]
    se = [c["se"] for c in res["fit"]["coefficients"]]
    assert coef == pytest.approx(list(ref.params), abs=1e-6)
    assert se == pytest.approx(list(ref.bse), abs=1e-6)


def test_inference_section_renders_in_the_html_report(root: Path, tmp_path: Path) -> None:
    from server.report_html import render_report_html

    nodes = image_nodes(root)
    grid = InProcessGrid(nodes)
    a, b = model_arrays(0), model_arrays(1)
    section = inference.inference_section(
        inference.pooled_metrics(grid, list(nodes), a, PLAN, split=k.SPLIT_TEST, timeout=5),
        paired=inference.paired_comparison(grid, list(nodes), a, b, PLAN,
                                           split=k.SPLIT_TEST, timeout=5),
        calibration_fit=inference.calibration_regression(grid, list(nodes), a, PLAN,
                                                         split=k.SPLIT_TEST, timeout=5),
    )
    assert set(section["calibration"]) >= {"mean_score", "observed", "count", "slope"}
    assert section["tests"]["mcnemar"] is not None and section["roc"]["pooled"]["pos"]
    path = render_report_html({"status": "completed", "inference": section},
                              tmp_path / "report.html")
    text = path.read_text()
    assert "data:image/png;base64," in text and "delong" in text.lower()


def test_cross_validation_heldout_fold_is_served(root: Path) -> None:
    from dataclasses import replace

    from client.app import _load, heldout_split

    nodes = image_nodes(root)
    plan = replace(PLAN, cv_mode="kfold", num_folds=3, fold=1)
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), model_arrays(0), plan,
                                   split=k.SPLIT_HELDOUT, timeout=5)
    assert res["status"] == "completed" and res["failures"] == []
    expected = sum(heldout_split(n, plan, _load(n, plan), k.SPLIT_HELDOUT).num_patients
                   for n in nodes.values())
    assert res["n"] == expected and res["split"] == k.SPLIT_HELDOUT


def test_noised_conformal_and_entropy_do_not_crash(root: Path, tmp_path: Path) -> None:
    nodes = image_nodes(root, stats_noise_multiplier=0.5, epsilon_cap=1e6, ledger_dir=tmp_path)
    grid = InProcessGrid(nodes)
    conf = inference.conformal_prediction(grid, list(nodes), model_arrays(0), PLAN, timeout=5,
                                          bins=100)
    ent = inference.predictive_entropy_summary(grid, list(nodes), PLAN, split=k.SPLIT_TEST,
                                               timeout=5, ensemble=[model_arrays(0),
                                                                    model_arrays(1)])
    for res in (conf, ent):
        assert res["status"] in {"completed", "failed"} and res["failures"] == []


def test_suppressed_cells_do_not_bias_threshold_metrics(root: Path) -> None:
    # With a minimum release count, small confusion cells are released as 0; the coordinator
    # then counts from the (consented, unsuppressed) histograms so the estimates still equal
    # the pooled-data computation, and says so.
    nodes = image_nodes(root, min_release_count=8)
    a = model_arrays(0)
    s, y = _pooled(nodes, a, k.SPLIT_TEST)
    per_site = [reference_scores(node, a, k.SPLIT_TEST) for node in nodes.values()]
    cells = [confusion_matrix(yy, (ss >= 0.5).astype(int), labels=[0, 1]).ravel()
             for ss, yy in per_site]
    assert any(0 < c < 8 for row in cells for c in row)  # the fixture has a small cell
    res = inference.pooled_metrics(InProcessGrid(nodes), list(nodes), a, PLAN,
                                   split=k.SPLIT_TEST, timeout=5, threshold=0.5)
    assert res["suppressed_cells"] > 0 and "histograms" in res["metrics_note"]
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.5).astype(int), labels=[0, 1]).ravel()
    assert res["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert res["metrics"]["accuracy"]["value"] == pytest.approx((tp + tn) / s.size)
