"""Pooled multi-class inference with secure aggregation on: equal to the plain path and sklearn.

Three synthetic three-class hospitals served in-process by the real ClientApp; one drops out of
the masked release in the second case (its secrets are recovered from the other two).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, confusion_matrix

from common import messages as k
from common.config import NodeConfig
from server.inference_multiclass import multiclass_inference
from server.inference_secure import HIDDEN, secure_queries
from tests.client.queries.fake_grid import InProcessGrid
from tests.server.multiclass_federation import (
    PLAN,
    multiclass_arrays,
    reference_probabilities,
    write_three_class_federation,
)
from tests.server.test_secure_inference import StageGrid, _clear_per_site_values

NODES = [31, 32, 33]
pytestmark = pytest.mark.slow  # ~45 s per case on 2 shared cores


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> dict[int, NodeConfig]:
    root = tmp_path_factory.mktemp("secure-mc")
    write_three_class_federation(root, n_sites=3, patients_per_site=90)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"m{i + 1}",
                            release_histograms=True, min_release_count=1, device="cpu")
            for i, nid in enumerate(NODES)}


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))


@pytest.mark.parametrize("drop", [{}, {33: "train"}])
def test_secure_multiclass_inference_equals_the_plain_path_and_sklearn(
        nodes: dict[int, NodeConfig], drop: dict[int, str], tmp_path: Path) -> None:
    arrays = multiclass_arrays(0)
    summed = [n for n in NODES if n not in drop]
    plain = multiclass_inference(InProcessGrid(nodes), summed, arrays, PLAN, timeout=5)
    grid = StageGrid(nodes, drop)
    with secure_queries(True, min_survivors=2):
        sec = multiclass_inference(grid, NODES, arrays, PLAN, timeout=5)
    parts = [reference_probabilities(nodes[n], arrays, k.SPLIT_TEST) for n in summed]
    probs, y = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    pred = probs.argmax(axis=1)
    assert sec["status"] == "completed" and [f["node_id"] for f in sec["failures"]] == list(drop)
    mc, ref = sec["multiclass"], plain["multiclass"]
    assert mc["confusion"] == ref["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert mc["accuracy"] == ref["accuracy"] and mc["accuracy"]["value"] == pytest.approx(
        accuracy_score(y, pred))
    assert mc["balanced_accuracy"] == ref["balanced_accuracy"]
    assert mc["loglik"] == pytest.approx(ref["loglik"], rel=1e-9)
    assert mc["roc"] == ref["roc"]
    assert mc["auc"] is not None and ref["auc"] is not None
    assert mc["auc"]["macro"]["value"] == pytest.approx(ref["auc"]["macro"]["value"], abs=1e-9)
    assert mc["auc"]["macro"]["se"] == pytest.approx(ref["auc"]["macro"]["se"], rel=1e-7)
    for a, b in zip(mc["auc"]["per_class"], ref["auc"]["per_class"], strict=True):
        assert a["value"] == pytest.approx(b["value"], abs=1e-9)
        assert a["se"] == pytest.approx(b["se"], rel=1e-7)
    assert mc["per_site"] == HIDDEN and isinstance(ref["per_site"], list)
    assert sec["secure_aggregation"]["covered"] and sec["sites"] == [
        f"m{NODES.index(n) + 1}" for n in summed]
    assert _clear_per_site_values(grid) == []
    from cli.report_view import print_inference
    from server.report_html import render_report_html

    render_report_html({"status": "completed", "inference": sec}, tmp_path / "report.html")
    print_inference(sec)
