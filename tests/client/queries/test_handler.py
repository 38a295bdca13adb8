"""The node's query handler called through the real ClientApp (in-process, as a SuperNode would)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict

from client.app import build_client_app
from client.data.tabular import design_matrix, load_tabular
from client.privacy_guard import NodeBudget
from client.queries import list_queries
from client.release import file_fingerprint
from common import messages as k
from common.config import NodeConfig, TrainPlan
from common.stats.bins import class_histograms, fine_score_edges
from common.stats.calibration import calibration_bin_sums
from common.stats.glm import logistic_node_stats
from common.stats.metrics import confusion_counts
from tests.client.queries.federation import PLAN, image_nodes, model_arrays, reference_scores
from tests.flower_helpers import incoming, node_context

COLUMNS = ["age", "sex", "cp=4", "thalach"]


@pytest.fixture
def heart(shared_file: Callable[[str], Path]) -> Path:
    return shared_file("heart_disease_uci/processed.hungarian.data")


def _node_config(**kw: object) -> dict[str, object]:
    return {k.NODE_DATA_DIR: "/nonexistent", k.NODE_SITE_NAME: "hu",
            **{key: value for key, value in kw.items()}}


def _ask(node_config: dict[str, object], config: dict[str, object],
         records: dict[str, object] | None = None) -> Message:
    content = RecordDict({k.CONFIG: ConfigRecord({**TrainPlan(run_id="r1").to_record(),
                                                  **config})})  # type: ignore[dict-item]
    for key, rec in (records or {}).items():
        content[key] = rec  # type: ignore[assignment]
    app = build_client_app()
    return app(incoming(content, MessageType.QUERY), node_context(node_config))


def _logistic_cfg(beta: list[float]) -> dict[str, object]:
    return {k.QUERY: "logistic", k.COLUMNS: COLUMNS, k.BETA: beta}


def test_registry_has_every_query_family() -> None:
    assert set(list_queries()) >= {"metrics", "placements", "mcnemar", "conformal", "entropy",
                                   "logistic"}


def test_logistic_reply_equals_node_statistics(heart: Path) -> None:
    beta = [0.1, -0.01, 0.5, 0.3, 0.002]
    reply = _ask(_node_config(**{k.NODE_TABULAR_PATH: str(heart)}), _logistic_cfg(beta))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    x, y = design_matrix(load_tabular(heart), COLUMNS)
    expected = logistic_node_stats(x, y, beta)
    m = reply.content[k.METRICS]
    np.testing.assert_allclose(m[k.GRAD], expected["grad"], rtol=1e-12)
    np.testing.assert_allclose(np.reshape(m[k.HESSIAN], (5, 5)), expected["hessian"], rtol=1e-12)
    assert m[k.LOGLIK] == pytest.approx(expected["loglik"], rel=1e-12)
    assert m[k.NUM_EXAMPLES] == 261 and m[k.NOISED] == 0
    assert reply.content[k.NODE_INFO][k.SITE] == "hu"


@pytest.mark.parametrize(("config", "reason"), [
    ({k.QUERY: "nope"}, "unknown query"),
    ({k.QUERY: "logistic", k.COLUMNS: ["thal"], k.BETA: [0.0, 0.0]}, "allow-list"),
    ({k.QUERY: "logistic", k.COLUMNS: COLUMNS, k.BETA: [0.0]}, "beta"),
    ({k.QUERY: "logistic", k.BETA: [0.0]}, "columns"),
    ({k.QUERY: "logistic", k.COLUMNS: COLUMNS, k.BETA: [0.0] * 5, k.SPLIT: "bogus"}, "split"),
])
def test_malformed_queries_get_a_safe_reason(heart: Path, config: dict[str, object],
                                             reason: str) -> None:
    reply = _ask(_node_config(**{k.NODE_TABULAR_PATH: str(heart)}), config)
    assert reply.has_error() and reason in reply.error.reason
    assert str(heart) not in reply.error.reason


def test_node_without_table_or_below_cohort_minimum_refuses(heart: Path) -> None:
    reply = _ask(_node_config(), _logistic_cfg([0.0] * 5))
    assert reply.has_error() and "tabular" in reply.error.reason
    reply = _ask(_node_config(**{k.NODE_TABULAR_PATH: str(heart),
                                 k.NODE_MIN_RELEASE_COUNT: 300}), _logistic_cfg([0.0] * 5))
    assert reply.has_error() and "minimum release count" in reply.error.reason


def test_noised_logistic_release_is_charged_and_refused_over_cap(heart: Path,
                                                                 tmp_path: Path) -> None:
    cfg = _node_config(**{k.NODE_TABULAR_PATH: str(heart), k.NODE_STATS_NOISE: 5.0,
                          k.NODE_EPSILON_CAP: 3.0, k.NODE_LEDGER_DIR: str(tmp_path)})
    reply = _ask(cfg, _logistic_cfg([0.0] * 5))
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content[k.METRICS]
    assert m[k.NOISED] == 1 and 0 < m[k.EPSILON] <= 3.0
    x, y = design_matrix(load_tabular(heart), COLUMNS)
    assert not np.allclose(m[k.GRAD], logistic_node_stats(x, y, np.zeros(5))["grad"])
    node = NodeConfig.from_user_config(cfg)
    ledger = NodeBudget.for_node(node).ledger
    assert [e.release for e in ledger.entries(file_fingerprint(heart), level="patient")] == [
        "query:logistic"]
    refused = [_ask(cfg, _logistic_cfg([0.0] * 5)) for _ in range(20)]
    assert any(r.has_error() and "cap" in r.error.reason for r in refused)
    spent = NodeBudget.for_node(node).check(file_fingerprint(heart), [], delta=1e-5)
    assert spent <= 3.0 + 1e-6  # never past the cap


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed")


def _image_cfg(root: Path, **kw: object) -> tuple[NodeConfig, dict[str, object]]:
    node = image_nodes(root, **kw)[11]
    cfg = {k.NODE_DATA_DIR: str(node.data_dir), k.NODE_SITE_NAME: node.site_name,
           k.NODE_RELEASE_HISTOGRAMS: node.release_histograms,
           k.NODE_MIN_RELEASE_COUNT: node.min_release_count, k.NODE_DEVICE: "cpu"}
    return node, cfg


def _ask_image(cfg: dict[str, object], config: dict[str, object],
               records: dict[str, object]) -> Message:
    record = ConfigRecord({**PLAN.to_record(), **config})  # type: ignore[dict-item]
    content = RecordDict({k.CONFIG: record})
    for key, rec in records.items():
        content[key] = rec  # type: ignore[assignment]
    return build_client_app()(incoming(content, MessageType.QUERY), node_context(cfg))


def test_metrics_reply_equals_direct_sums(images: Path) -> None:
    node, cfg = _image_cfg(images)
    arrays = model_arrays(0)
    reply = _ask_image(cfg, {k.QUERY: "metrics", k.SPLIT: k.SPLIT_TEST, k.THRESHOLD: 0.99,
                             k.CALIBRATION_BINS: 7}, {k.ARRAYS: arrays})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content[k.METRICS]
    scores, labels = reference_scores(node, arrays, k.SPLIT_TEST)
    cm = confusion_counts(scores, labels, 0.99)
    assert [m[k.TP], m[k.FP], m[k.TN], m[k.FN]] == [cm["tp"], cm["fp"], cm["tn"], cm["fn"]]
    cal = calibration_bin_sums(scores, labels, edges=np.linspace(0, 1, 8))
    assert m[k.CAL_COUNT] == cal["count"].tolist()
    np.testing.assert_allclose(m[k.CAL_SCORE_SUM], cal["score_sum"], rtol=1e-12)
    assert m[k.BRIER_SUM] == pytest.approx(cal["sq_error_sum"], rel=1e-12)
    pos, neg = class_histograms(scores, labels)
    assert m[k.HIST_POSITIVE] == pos.tolist() and m[k.HIST_NEGATIVE] == neg.tolist()
    assert m[k.NUM_EXAMPLES] == scores.size


def test_histograms_only_with_consent_and_small_cells_suppressed(images: Path) -> None:
    node, cfg = _image_cfg(images, release_histograms=False, min_release_count=4)
    reply = _ask_image(cfg, {k.QUERY: "metrics", k.SPLIT: k.SPLIT_TEST, k.THRESHOLD: 0.99},
                       {k.ARRAYS: model_arrays(0)})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    m = reply.content[k.METRICS]
    assert k.HIST_POSITIVE not in m and k.HIST_NEGATIVE not in m
    scores, labels = reference_scores(node, model_arrays(0), k.SPLIT_TEST)
    cm = confusion_counts(scores, labels, 0.99)
    exact = [cm["tp"], cm["fp"], cm["tn"], cm["fn"],
             *calibration_bin_sums(scores, labels)["count"].tolist()]
    small = [1 <= c < 4 for c in exact]
    assert any(small)  # the fixture has small cells to suppress
    released = [m[k.TP], m[k.FP], m[k.TN], m[k.FN], *m[k.CAL_COUNT]]
    assert released == [0 if s else c for c, s in zip(exact, small, strict=True)]
    assert m[k.SUPPRESSED_CELLS] == sum(small)
    conformal = _ask_image(cfg, {k.QUERY: "conformal", k.SPLIT: k.SPLIT_VAL},
                           {k.ARRAYS: model_arrays(0)})
    assert conformal.has_error() and "release-histograms" in conformal.error.reason


def test_placements_need_pooled_histograms_and_models(images: Path) -> None:
    _, cfg = _image_cfg(images)
    reply = _ask_image(cfg, {k.QUERY: "placements", k.SPLIT: k.SPLIT_TEST},
                       {k.ARRAYS: model_arrays(0)})
    assert reply.has_error() and "pooled histograms" in reply.error.reason
    nb = fine_score_edges().size - 1
    pooled = MetricRecord({k.HIST_POSITIVE: [0] * nb, k.HIST_NEGATIVE: [0] * (nb - 1)})
    reply = _ask_image(cfg, {k.QUERY: "placements", k.SPLIT: k.SPLIT_TEST},
                       {k.ARRAYS: model_arrays(0), k.POOLED: pooled})
    assert reply.has_error() and "bins" in reply.error.reason
    reply = _ask_image(cfg, {k.QUERY: "mcnemar", k.SPLIT: k.SPLIT_TEST},
                       {k.ARRAYS: model_arrays(0)})
    assert reply.has_error() and k.ARRAYS_B in reply.error.reason


def test_exact_placements_refuse_crafted_pooled_histograms(images: Path) -> None:
    # A coordinator putting all negative mass in one bin would learn, from exact placement
    # sums, how many positives score above that bin: the node refuses such "pooled" counts.
    node, cfg = _image_cfg(images)
    scores, labels = reference_scores(node, model_arrays(0), k.SPLIT_TEST)
    pos, neg = class_histograms(scores, labels)
    crafted_neg = np.zeros_like(neg)
    crafted_neg[len(neg) // 2] = 1000
    for p_hist, n_hist in ((pos, crafted_neg), (pos - 1, neg), (pos + 0.5, neg)):
        pooled = MetricRecord({k.HIST_POSITIVE: [float(v) for v in p_hist],
                               k.HIST_NEGATIVE: [float(v) for v in n_hist]})
        reply = _ask_image(cfg, {k.QUERY: "placements", k.SPLIT: k.SPLIT_TEST},
                           {k.ARRAYS: model_arrays(0), k.POOLED: pooled})
        assert reply.has_error() and "not pooled counts" in reply.error.reason
    # Genuine pooled counts (own histogram plus other sites') are served.
    pooled = MetricRecord({k.HIST_POSITIVE: [int(v) + 1 for v in pos],
                           k.HIST_NEGATIVE: [int(v) + 2 for v in neg]})
    reply = _ask_image(cfg, {k.QUERY: "placements", k.SPLIT: k.SPLIT_TEST},
                       {k.ARRAYS: model_arrays(0), k.POOLED: pooled})
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    # Without histogram consent, no exact placement sums at all.
    _, no_consent = _image_cfg(images, release_histograms=False)
    reply = _ask_image(no_consent, {k.QUERY: "placements", k.SPLIT: k.SPLIT_TEST},
                       {k.ARRAYS: model_arrays(0), k.POOLED: pooled})
    assert reply.has_error() and "release-histograms" in reply.error.reason


def test_only_training_fit_queries_read_the_training_split(images: Path) -> None:
    _, cfg = _image_cfg(images)
    reply = _ask_image(cfg, {k.QUERY: "metrics", k.SPLIT: k.SPLIT_TRAIN},
                       {k.ARRAYS: model_arrays(0)})
    assert reply.has_error() and "'metrics' uses split" in reply.error.reason
