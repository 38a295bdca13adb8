"""Pooled inference with secure aggregation on: the same numbers, no per-hospital value seen.

The real ClientApp serves four synthetic hospitals in-process (with its secure-aggregation mod
and stage handler); a grid silences a node from a chosen stage on (a dropout). Every pooled
number is compared with the plain path (exactly for counts, within the fixed-point bound for
float sums) and with scikit-learn on the pooled patients of the nodes that were summed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import Message
from sklearn.metrics import brier_score_loss, confusion_matrix, log_loss, roc_auc_score

from client.queries.secure_release import encode_for_secure_sum
from common import messages as k
from common.config import NodeConfig
from server import inference
from server.inference_secure import HIDDEN, decode_fixed, secure_queries
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import PLAN, model_arrays, reference_scores
from tests.server.secagg_fakes import STAGE_ORDER, stage_of

NODES = [21, 22, 23, 24]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NodeConfig]:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("secure-fed")
    synthesize_federation(root, n_sites=4, patients_per_site=60, images_per_patient=(1, 2),
                          image_size=16, seed=5)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"h{i + 1}",
                            release_histograms=True, min_release_count=1, device="cpu")
            for i, nid in enumerate(NODES)}


class StageGrid(InProcessGrid):
    """The real ClientApp in-process; ``drop[node] = stage`` silences it from that stage on."""

    def __init__(self, nodes: Mapping[int, NodeConfig], drop: Mapping[int, str] | None = None
                 ) -> None:
        super().__init__(nodes)
        self.drop = dict(drop or {})

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None
                         ) -> list[Message]:
        keep = []
        for msg in messages:
            start = self.drop.get(int(msg.metadata.dst_node_id))
            if start is not None and STAGE_ORDER.index(stage_of(msg)) >= STAGE_ORDER.index(start):
                self.sent.append(msg)
                continue
            keep.append(msg)
        return super().send_and_receive(keep, timeout=timeout)


_PER_SITE = {"per_site", "sites", "secure_aggregation", "ledger_heads", "failures", "auc_sites",
             "meta", "note"}


def assert_same_section(secure: Any, plain: Any, path: str = "") -> None:
    """The secure section equals the plain one: counts (ints) exactly, floats within rel
    1e-7 (the float sums are within n x 2^-33 of the plain ones; variances from sums of
    squares amplify that by cancellation); per-site parts are left out (hidden, or absent)."""
    if isinstance(plain, Mapping):
        assert isinstance(secure, Mapping), path
        for key in plain:
            if key in _PER_SITE or str(key).startswith("meta_"):
                continue
            assert key in secure, f"{path}.{key} missing"
            assert_same_section(secure[key], plain[key], f"{path}.{key}")
    elif isinstance(plain, (list, tuple)) and not isinstance(plain, str):
        assert isinstance(secure, (list, tuple)) and len(secure) == len(plain), path
        for i, (a, b) in enumerate(zip(secure, plain, strict=True)):
            assert_same_section(a, b, f"{path}[{i}]")
    elif isinstance(plain, float) and not isinstance(plain, bool):
        assert secure == pytest.approx(plain, rel=1e-7, abs=1e-9, nan_ok=True), path
    else:
        assert secure == plain, path


def _pooled(nodes: Mapping[int, NodeConfig], ids: Iterable[int]) -> tuple[np.ndarray, np.ndarray]:
    a = model_arrays(0)
    parts = [reference_scores(nodes[i], a, k.SPLIT_TEST) for i in ids]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _clear_per_site_values(grid: InProcessGrid) -> list[str]:
    """Summed keys that left any node in the clear during the secure rounds."""
    summed = {k.TP, k.FP, k.TN, k.FN, k.CAL_COUNT, k.CAL_SCORE_SUM, k.HIST_POSITIVE,
              k.NUM_EXAMPLES, k.LOGLIK, k.BRIER_SUM, k.V10_SUM, k.SITE_V10_CROSS, k.CONFUSION,
              k.OVR_HIST_POSITIVE}
    seen = []
    for reply in grid.replies:
        if reply.has_error():
            continue
        metrics = reply.content.get(k.METRICS)
        seen += [key for key in (metrics or {}) if key in summed]
    return seen


def test_fixed_point_cells_round_trip_exactly() -> None:
    config = {"secagg-fixed-bits": 32,
              k.SECAGG_INT_KEYS: ["a.fx", "b.fx", "c.fx", "secagg-present"],
              k.SECAGG_INT_LENGTHS: [6, 2, 2, 3]}
    values = [{"a": np.array([3.0, -1.25, 1e6]), "b": -7.0}, {"a": np.array([2, 0, 5]), "b": 1.5}]
    cells = [encode_for_secure_sum(v, config) for v in values]
    assert all(0 <= c <= 2**32 for out in cells for key in "abc" for c in out[key + ".fx"])
    assert cells[0]["secagg-present"] == [1, 1, 0] and cells[0]["c.fx"] == [0, 0]
    assert set(cells[0]) == {"a.fx", "b.fx", "c.fx", "secagg-present"}  # nothing else leaves
    total = np.sum([np.asarray(c["a.fx"], dtype=np.int64) for c in cells], axis=0)
    assert decode_fixed(total, 2).tolist() == [5.0, -1.25, 1e6 + 5]
    b = np.sum([np.asarray(c["b.fx"], dtype=np.int64) for c in cells], axis=0)
    assert decode_fixed(b, 2).tolist() == [-5.5]


def test_newton_fits_on_secure_sums_know_their_rounding() -> None:
    """A securely summed round's cells are exact to half a fixed-point unit per node summed,
    which the GLM's Newton-Raphson reads as ``sum_error``; a round in the clear is exact."""
    secure = inference.QueryRound(values={-1: {}}, secure={"covered": True, "members": [21, 22, 23]})
    assert inference._fixed_point_error(secure) == 3 * 2.0**-33
    assert inference._fixed_point_error(inference.QueryRound(values={21: {}})) == 0.0
    assert inference._fixed_point_error(inference.QueryRound(secure={"covered": False})) == 0.0


@pytest.mark.parametrize("drop", [{}, {23: "train"}, {24: "unmask"}])
def test_secure_pooled_metrics_equal_the_plain_path_and_sklearn(
        nodes: dict[int, NodeConfig], drop: dict[int, str]) -> None:
    a = model_arrays(0)
    survivors = [n for n in NODES if drop.get(n) not in ("train", "advertise", "share")]
    plain = inference.pooled_metrics(InProcessGrid(nodes), survivors, a, PLAN,
                                     split=k.SPLIT_TEST, timeout=5, threshold=0.99)
    grid = StageGrid(nodes, drop)
    with secure_queries(True, min_survivors=3):
        res = inference.pooled_metrics(grid, NODES, a, PLAN, split=k.SPLIT_TEST, timeout=5,
                                       threshold=0.99)
    assert res["status"] == "completed"
    assert sorted(f["node_id"] for f in res["failures"]) == sorted(
        n for n in NODES if n not in survivors)
    s, y = _pooled(nodes, survivors)
    # counts: exactly the plain path's and sklearn's on the pooled patients
    tn, fp, fn, tp = confusion_matrix(y, (s >= 0.99).astype(int), labels=[0, 1]).ravel()
    assert res["confusion"] == plain["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert res["n"] == plain["n"] == s.size
    assert res["metrics"]["accuracy"] == plain["metrics"]["accuracy"]
    assert res["calibration"]["count"] == plain["calibration"]["count"]
    assert res["roc"]["pooled"] == plain["roc"]["pooled"]
    # float sums: within the fixed-point bound (4 nodes x 2^-33), i.e. to float precision
    assert res["metrics"]["brier"] == pytest.approx(brier_score_loss(y, s), rel=1e-9)
    assert res["loglik"] == pytest.approx(-log_loss(y, s, normalize=False), rel=1e-9)
    auc = res["metrics"]["auc"]
    assert auc["method"] == "delong" and abs(auc["value"] - roc_auc_score(y, s)) <= 1e-4
    # the DeLong point estimate is a placement sum / n_pos: within 4 x 2^-33 / n_pos
    assert auc["value"] == pytest.approx(plain["metrics"]["auc"]["value"], abs=1e-9)
    assert auc["se"] == pytest.approx(plain["metrics"]["auc"]["se"], rel=1e-9)
    # nothing per hospital: no site rows, no meta-analysis, no site histograms, no clear sums
    assert res["per_site"] == HIDDEN and res["auc_sites"] == [] and res["meta"] == {}
    assert res["roc"]["sites"] == {} and plain["roc"]["sites"]
    assert res["secure_aggregation"]["covered"] and res["sites"] == [
        f"h{NODES.index(n) + 1}" for n in survivors]
    assert _clear_per_site_values(grid) == []


def test_secure_inference_below_the_minimum_fails_without_revealing(
        nodes: dict[int, NodeConfig]) -> None:
    grid = StageGrid(nodes, {23: "share", 24: "share"})
    with secure_queries(True, min_survivors=3):
        res = inference.pooled_metrics(grid, NODES, model_arrays(0), PLAN, split=k.SPLIT_TEST,
                                       timeout=5)
    assert res["status"] == "failed" and len(res["failures"]) == 4
    assert any("abandoned" in f["reason"] for f in res["failures"])
    assert _clear_per_site_values(grid) == []


def test_secure_calibration_fit_and_mcnemar_equal_the_plain_path(
        nodes: dict[int, NodeConfig]) -> None:
    a, b = model_arrays(0), model_arrays(1)

    def both(fn: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        plain = fn(InProcessGrid(nodes))
        grid = StageGrid(nodes)
        with secure_queries(True, min_survivors=3):
            secure = fn(grid)
        assert _clear_per_site_values(grid) == []
        return plain, secure

    plain, secure = both(lambda g: inference.calibration_regression(
        g, NODES, a, PLAN, split=k.SPLIT_TEST, timeout=5))
    assert secure["status"] == "completed" and secure["sites"] == plain["sites"]
    for p_row, s_row in zip(plain["fit"]["coefficients"], secure["fit"]["coefficients"],
                            strict=True):
        assert s_row["coef"] == pytest.approx(p_row["coef"], rel=1e-7, abs=1e-9)
        assert s_row["se"] == pytest.approx(p_row["se"], rel=1e-7)
    plain, secure = both(lambda g: inference.paired_comparison(
        g, NODES, a, b, PLAN, split=k.SPLIT_TEST, timeout=5, threshold=0.99))
    assert secure["mcnemar"] == plain["mcnemar"]
    assert secure["delong"]["se"] == pytest.approx(plain["delong"]["se"], rel=1e-9)
    assert secure["delong"]["diff"] == pytest.approx(plain["delong"]["diff"], abs=1e-9)


@pytest.mark.slow  # ~75 s: two full calibrated inferences (GLM rounds, three metrics rounds)
def test_secure_binary_headline_path_equals_the_plain_path_and_renders(
        nodes: dict[int, NodeConfig], tmp_path: Path) -> None:
    from cli.report_view import print_inference
    from server.final_model import calibrated_inference
    from server.report_html import render_report_html

    a = model_arrays(0)
    plain = calibrated_inference(InProcessGrid(nodes), NODES, a, PLAN, timeout=5)
    grid = StageGrid(nodes)
    with secure_queries(True, min_survivors=3):
        sec = calibrated_inference(grid, NODES, a, PLAN, timeout=5)
    assert _clear_per_site_values(grid) == []
    assert sec["status"] == "completed" and sec["failures"] == []
    # recalibration map (Newton on secure GLM sums), operating point and test metrics
    for key in ("intercept", "slope"):
        assert sec["calibration"]["map"][key] == pytest.approx(
            plain["calibration"]["map"][key], rel=1e-7, abs=1e-9)
    op, op_plain = sec["operating_point"], plain["operating_point"]
    assert op["calibrated_threshold"] == op_plain["calibrated_threshold"]
    assert {key: op["validation"][key] for key in ("tp", "fp", "tn", "fn")} == {
        key: op_plain["validation"][key] for key in ("tp", "fp", "tn", "fn")}
    assert sec["confusion"] == plain["confusion"]
    for name in ("accuracy", "sensitivity", "specificity"):
        assert sec["metrics"][name] == plain["metrics"][name]
    assert sec["metrics"]["auc"]["value"] == pytest.approx(
        plain["metrics"]["auc"]["value"], abs=1e-9)
    assert sec["calibration"]["before"]["count"] == plain["calibration"]["before"]["count"]
    assert sec["per_site"] == HIDDEN and sec["meta"] == {}
    assert plain["auc_sites"] and plain["meta"]  # what the secure section leaves out
    # the report and the CLI view render the secure section
    text = render_report_html({"status": "completed", "inference": {"task": "binary", **sec}},
                              tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in text
    print_inference({"task": "binary", **sec})


def test_noised_releases_are_noised_before_masking_and_charged(
        nodes: dict[int, NodeConfig], tmp_path: Path) -> None:
    """Node release rules apply first: Gaussian noise (negative values included) is added and
    charged at each node, then the noised values are masked; the sums stay usable."""
    from dataclasses import replace

    from client.app import _load
    from client.privacy_guard import NodeBudget

    noisy = {n: replace(c, stats_noise_multiplier=1.0, epsilon_cap=1e6,
                        ledger_dir=tmp_path / f"ledger-{n}") for n, c in nodes.items()}
    grid = StageGrid(noisy)
    with secure_queries(True, min_survivors=3):
        res = inference.pooled_metrics(grid, NODES, model_arrays(0), PLAN, split=k.SPLIT_TEST,
                                       timeout=5)
    assert res["status"] == "completed" and res["noised"] and res["failures"] == []
    assert 0.0 <= res["metrics"]["auc"]["value"] <= 1.0 and res["per_site"] == HIDDEN
    s, _ = _pooled(nodes, NODES)
    assert abs(res["n"] - s.size) <= 30  # the patient count is noised (sd 1 per node)
    assert _clear_per_site_values(grid) == []
    for node in noisy.values():
        entries = NodeBudget.for_node(node).ledger.entries(_load(node, PLAN).fingerprint)
        assert [e.release for e in entries] == ["query:metrics", "query:placements"]
        assert all(e.mechanism.kind == "gaussian" for e in entries)
