"""Pooled multi-label inference against scikit-learn and statsmodels on the pooled patients.

Three hand-made hospitals (:mod:`tests.server.task_class_federation`) are served in-process by
the real ClientApp. References: ``roc_auc_score`` per finding on the binned scores, DeLong's
variance and the findings' covariance computed directly from the pooled binned scores,
``multipletests(method="holm")`` and Wilson intervals from statsmodels, ``recall_score``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flwr.app import ArrayRecord, MetricRecord
from scipy.stats import norm
from sklearn.metrics import recall_score, roc_auc_score
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.proportion import proportion_confint

from common import messages as k
from common.config import TrainPlan
from common.stats.bins import fine_score_edges, score_bin_index
from server.inference import query_nodes
from server.inference_multilabel import multilabel_inference
from tests.client.queries.fake_grid import InProcessGrid
from tests.server.task_class_federation import (
    make_nodes,
    make_split,
    task_queries,  # noqa: F401  (fixture)
    model_arrays,
    reference_outputs,
    serve_splits,
)

K = 3
PLAN = TrainPlan(task="multilabel", num_classes=K, image_size=8, model="mlp", run_id="t-ml")
Z = float(norm.ppf(0.975))


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, task_queries: None) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))


def _serve(monkeypatch: pytest.MonkeyPatch, *, prevalence: tuple[float, ...] = (0.5, 0.3, 0.6),
           sizes: tuple[int, ...] = (50, 64, 41), seed: int = 5) -> dict:
    rng = np.random.default_rng(seed)
    out = {f"s{i + 1}": make_split(rng, (rng.random((n, K)) < np.array(prevalence)).astype(int))
           for i, n in enumerate(sizes)}
    serve_splits(monkeypatch, out)
    return out


def _pooled(splits: dict, arrays: ArrayRecord, sites: list[str]) -> tuple[np.ndarray,
                                                                          np.ndarray]:
    parts = [reference_outputs(PLAN, arrays, splits[s]) for s in sites]
    return np.concatenate([p for p, _ in parts]), np.concatenate([y for _, y in parts])


def _binned(probs: np.ndarray) -> np.ndarray:
    return np.stack([score_bin_index(probs[:, j], fine_score_edges()) for j in range(K)], 1)


def _scaled_placements(b: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(AUC, u(i)) of one finding from binned scores: DeLong placements, centred, scaled."""
    pos, neg = b[y == 1], b[y == 0]
    psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    auc = float(psi.mean())
    u = np.empty(b.size)
    u[y == 1] = (psi.mean(axis=1) - auc) / np.sqrt(pos.size * (pos.size - 1))
    u[y == 0] = (psi.mean(axis=0) - auc) / np.sqrt(neg.size * (neg.size - 1))
    return auc, u


def test_pooled_multilabel_aucs_equal_sklearn_on_the_pooled_patients(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare
    splits = _serve(monkeypatch)
    nodes = make_nodes(tmp_path)
    arrays = model_arrays(PLAN, 2, scale=3.0)
    probs, y = _pooled(splits, arrays, ["s1", "s2", "s3"])
    b = _binned(probs)
    # Execute
    sec = multilabel_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: counts and prevalence ...
    assert sec["status"] == "completed" and sec["failures"] == [] and sec["auc_note"] == ""
    assert sec["task"] == "multilabel" and sec["labels"] == K and sec["n"] == y.shape[0] == 155
    ml = sec["multilabel"]
    assert ml["positives"] == y.sum(axis=0).tolist()
    np.testing.assert_allclose(ml["prevalence"], y.mean(axis=0))
    # ... per-finding AUCs, DeLong SEs, raw and Holm p-values ...
    refs = [_scaled_placements(b[:, j], y[:, j]) for j in range(K)]
    aucs = [roc_auc_score(y[:, j], b[:, j]) for j in range(K)]
    np.testing.assert_allclose([e["value"] for e in ml["auc"]["per_label"]], aucs, atol=1e-12)
    np.testing.assert_allclose([a for a, _ in refs], aucs, atol=1e-12)
    se = np.array([np.sqrt(np.sum(u**2)) for _, u in refs])
    np.testing.assert_allclose([e["se"] for e in ml["auc"]["per_label"]], se, rtol=1e-9)
    p = 2 * norm.sf(np.abs(np.array(aucs) - 0.5) / se)
    np.testing.assert_allclose(ml["auc"]["p_values"], p, rtol=1e-9)
    np.testing.assert_allclose(ml["auc"]["p_holm"], multipletests(p, method="holm")[1],
                               rtol=1e-9)
    # ... the macro AUC with the covariance of the findings' AUCs ...
    U = np.stack([u for _, u in refs], axis=1)
    macro_se = float(np.sqrt((U.T @ U).sum())) / K
    macro = ml["auc"]["macro"]
    assert macro["value"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert macro["se"] == pytest.approx(macro_se, rel=1e-9)
    assert (macro["lower"], macro["upper"]) == pytest.approx(
        (np.mean(aucs) - Z * macro_se, np.mean(aucs) + Z * macro_se), rel=1e-9)
    # ... sensitivity and specificity at 0.5, and the per-site rows.
    called = (probs >= 0.5).astype(int)
    for j in range(K):
        assert ml["sensitivity"][j]["value"] == pytest.approx(recall_score(y[:, j],
                                                                           called[:, j]))
        assert ml["specificity"][j]["value"] == pytest.approx(
            recall_score(1 - y[:, j], 1 - called[:, j]))
        lo, hi = proportion_confint(int((called[:, j] & y[:, j]).sum()), int(y[:, j].sum()),
                                    method="wilson")
        assert (ml["sensitivity"][j]["lower"], ml["sensitivity"][j]["upper"]) == \
            pytest.approx((lo, hi))
    for row in ml["per_site"]:
        p_site, y_site = reference_outputs(PLAN, arrays, splits[row["site"]])
        b_site = _binned(p_site)
        assert row["n"] == y_site.shape[0] and row["positives"] == y_site.sum(0).tolist()
        assert row["macro_auc"] == pytest.approx(np.mean(
            [roc_auc_score(y_site[:, j], b_site[:, j]) for j in range(K)]), abs=1e-12)
    assert [sum(r["pos"]) for r in ml["roc"]] == y.sum(axis=0).tolist()


def test_a_node_without_histogram_consent_is_left_out_of_the_aucs(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: s2 does not release score histograms
    splits = _serve(monkeypatch)
    nodes = make_nodes(tmp_path)
    ids = list(nodes)
    nodes[ids[1]] = make_nodes(tmp_path, release_histograms=False)[ids[1]]
    arrays = model_arrays(PLAN, 2, scale=3.0)
    probs, y = _pooled(splits, arrays, ["s1", "s3"])
    b = _binned(probs)
    # Execute
    sec = multilabel_inference(InProcessGrid(nodes), ids, arrays, PLAN, timeout=5)
    # Assert: the AUCs pool s1 and s3 (with DeLong CIs), the note says so, n counts all three
    assert sec["status"] == "completed" and sec["failures"] == []
    assert "2 of 3 sites" in sec["auc_note"] and sec["n"] == 155
    _, y_all = _pooled(splits, arrays, ["s1", "s2", "s3"])
    assert sec["multilabel"]["positives"] == y_all.sum(axis=0).tolist()  # all three sites
    np.testing.assert_allclose([e["value"] for e in sec["multilabel"]["auc"]["per_label"]],
                               [roc_auc_score(y[:, j], b[:, j]) for j in range(K)],
                               atol=1e-12)
    assert sec["multilabel"]["auc"]["macro"]["method"] == "delong-covariance"
    assert sec["multilabel"]["per_site"][1]["macro_auc"] is None


def test_placements_are_refused_under_the_minimum_count_and_aucs_lose_their_cis(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: finding 1 has ~30% prevalence: fewer than 20 positives at some site
    splits = _serve(monkeypatch)
    nodes = make_nodes(tmp_path, min_release_count=20)
    arrays = model_arrays(PLAN, 2, scale=3.0)
    probs, y = _pooled(splits, arrays, ["s1", "s2", "s3"])
    # Execute
    sec = multilabel_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: refusals named per node; histogram AUCs (no interval) and a note
    assert sec["status"] == "completed"
    assert {f["query"] for f in sec["failures"]} == {"multilabel-placements"}
    assert all("minimum release count" in f["reason"] for f in sec["failures"])
    auc = sec["multilabel"]["auc"]
    assert auc["macro"]["method"] == "histogram" and auc["macro"]["lower"] is None
    b = _binned(probs)
    assert auc["macro"]["value"] == pytest.approx(
        np.mean([roc_auc_score(y[:, j], b[:, j]) for j in range(K)]), abs=1e-12)
    assert "DeLong CIs unavailable" in sec["auc_note"]


def test_a_finding_without_pooled_positives_leaves_its_auc_undefined(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: finding 2 is never present
    _serve(monkeypatch, prevalence=(0.5, 0.4, 0.0))
    nodes = make_nodes(tmp_path)
    grid = InProcessGrid(nodes)
    # Execute
    sec = multilabel_inference(grid, list(nodes), model_arrays(PLAN, 2), PLAN, timeout=5)
    # Assert: no placement round; the note names the finding
    assert sec["status"] == "completed" and sec["multilabel"]["prevalence"][2] == 0.0
    assert "finding(s) 2" in sec["auc_note"]
    assert sec["multilabel"]["auc"]["per_label"][2]["value"] is None
    assert {m.content[k.CONFIG][k.QUERY] for m in grid.sent} == {"multilabel-metrics"}


def test_forged_pooled_histograms_are_refused(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: "pooled" histograms of zeros cannot contain any node's own counts
    _serve(monkeypatch)
    nodes = make_nodes(tmp_path)
    bins = fine_score_edges().size - 1
    zeros = MetricRecord({k.LABEL_HIST_POSITIVE: [0] * (K * bins),
                          k.LABEL_HIST_NEGATIVE: [0] * (K * bins)})
    # Execute
    res = query_nodes(InProcessGrid(nodes), list(nodes), "multilabel-placements",
                      {**PLAN.to_record(), k.SPLIT: k.SPLIT_TEST}, timeout=5,
                      records={k.ARRAYS: model_arrays(PLAN, 2), k.POOLED: zeros})
    # Assert
    assert res.values == {} and len(res.failures) == 3
    assert all("not pooled counts that include" in f["reason"] for f in res.failures)


def test_noised_multilabel_releases_are_charged_and_still_pooled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: hospitals that noise every statistic (and charge it to their ledgers)
    from client.privacy_guard import NodeBudget

    _serve(monkeypatch)
    nodes = make_nodes(tmp_path, stats_noise_multiplier=2.0, epsilon_cap=50.0)
    # Execute
    sec = multilabel_inference(InProcessGrid(nodes), list(nodes), model_arrays(PLAN, 2), PLAN,
                               timeout=5)
    # Assert: both rounds are noised, charged at patient level, and still give AUCs in [0, 1]
    assert sec["status"] == "completed" and sec["noised"] and sec["failures"] == []
    values = [e["value"] for e in sec["multilabel"]["auc"]["per_label"]]
    assert len(values) == K and all(0.0 <= v <= 1.0 for v in values)
    for node in nodes.values():
        entries = NodeBudget.for_node(node).ledger.entries(f"fp-{node.site_name}")
        assert [(e.release, e.level) for e in entries] == [
            ("query:multilabel-metrics", "patient"), ("query:multilabel-placements", "patient")]


@pytest.mark.parametrize("drop", [{}, {33: "train"}])
def test_secure_aggregation_gives_the_plain_sections_numbers(
        tmp_path: Path, drop: dict[int, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from server.inference_secure import HIDDEN, secure_queries
    from tests.server.test_secure_inference import (
        StageGrid,
        _clear_per_site_values,
        assert_same_section,
    )

    _serve(monkeypatch)
    nodes = make_nodes(tmp_path)
    arrays = model_arrays(PLAN, 2, scale=3.0)
    summed = [n for n in nodes if n not in drop]
    plain = multilabel_inference(InProcessGrid(nodes), summed, arrays, PLAN, timeout=5)
    grid = StageGrid(nodes, drop)
    with secure_queries(True, min_survivors=2):
        sec = multilabel_inference(grid, list(nodes), arrays, PLAN, timeout=5)
    assert sec["status"] == "completed" and [f["node_id"] for f in sec["failures"]] == list(drop)
    assert_same_section(sec, plain)
    assert sec["multilabel"]["per_site"] == HIDDEN and sec["secure_aggregation"]["covered"]
    assert _clear_per_site_values(grid) == []
    # the HTML report and the CLI view render the section, saying the rows are hidden
    from cli.report_view import print_inference
    from server.report_html import render_report_html

    text = render_report_html({"status": "completed", "inference": sec},
                              tmp_path / "report.html").read_text()
    assert "hidden by secure aggregation" in text
    print_inference(sec)
