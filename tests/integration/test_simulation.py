"""A 3-site x 2-round simulated federation through Flower's simulation runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.config import NodeConfig, RunConfig, TrainPlan

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("sim")
    synthesize_federation(root / "data", n_sites=3, patients_per_site=40, seed=5)
    return root


def test_three_sites_two_rounds(federation: Path, _private_vesalius_home: Path) -> None:
    from server.simulation import run_simulation

    # Prepare
    out = federation / "run"
    config = RunConfig(
        plan=TrainPlan(num_rounds=2, batch_size=8, target_epsilon=8.0), out_dir=str(out), min_nodes=3
    )
    nodes = [
        NodeConfig(data_dir=federation / "data" / f"site-{i}", epsilon_cap=8.0, site_name=f"site-{i}",
                   release_histograms=True, min_release_count=1)
        for i in (1, 2, 3)
    ]
    seen: list[int] = []
    # Execute
    report = run_simulation(config, nodes, on_round=lambda e: seen.append(e.round))
    # Assert
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed" and seen == [1, 2]
    assert [r["round"] for r in doc["rounds"]] == [1, 2]
    assert all("auc" in r["metrics"] for r in doc["rounds"])
    assert sorted(s["site"] for s in doc["sites"]) == ["site-1", "site-2", "site-3"]
    # three hospitals: secure aggregation is on by default, so the coordinator never sees a
    # hospital's patient count (the node's delta is still below 1/n, checked at the node)
    assert doc["secure_aggregation"] and all(s["num_examples"] is None for s in doc["sites"])
    for site in doc["sites"]:
        assert 0 < site["epsilon"] <= 8.0 and 0 < site["delta"] < 1e-2
    eps = [{row["site"]: row["epsilon"] for row in r["train"]} for r in doc["rounds"]]
    assert all(0 < eps[0][site] < eps[1][site] for site in eps[0])
    assert doc["final"]["auc_pooled"] is not None
    assert (out / "checkpoints" / "round-1.pt").exists() and (out / "checkpoints" / "round-2.pt").exists()
    assert report.status == "completed" and len(report.rounds) == 2
    # Every site's spend is in the (here shared) node ledger, signed and chained; on a first run
    # the dataset's epsilon is the run's, and PRV is reported beside RDP.
    from common.ledger import verify_ledger

    from common.ledger import Ledger

    ledger = _private_vesalius_home / "ledger" / "ledger.jsonl"
    assert verify_ledger(ledger).ok
    records = Ledger(ledger).read().records
    trains = [r.entry for r in records if r.entry.release == "train"]
    assert len(trains) == 3 * 2 and all(e.level == "patient" for e in trains)
    # Every other release is on the record, as exact: validation metrics each round at every
    # site, the final test evaluation and the final statistics queries.
    others = [(r.entry.release, r.entry.level) for r in records if r.entry.release != "train"]
    assert others.count(("evaluate:val", "exact")) == 3 * 2
    assert others.count(("evaluate:test", "exact")) == 3
    assert ("query:metrics", "exact") in others
    assert all(level == "exact" for _, level in others)
    # Each site's ledger head in the report anchors the last entry (here the shared ledger's).
    heads = {s["ledger_head"] for s in doc["sites"]}
    assert f"{records[-1].index}:{records[-1].hash}" in heads
    for site in doc["sites"]:
        assert site["epsilon_dataset"] == pytest.approx(site["epsilon"], rel=1e-9)
        assert site["epsilon_prv"] is not None and site["epsilon_cap"] == 8.0


def test_node_over_cap_is_reported_not_crashed(federation: Path) -> None:
    from server.simulation import run_simulation

    out = federation / "run-cap"
    # min-nodes 1: one hospital's result is enough for this run (with 2, the round would fail:
    # min-nodes counts aggregated results, tests/server/test_faults.py)
    config = RunConfig(plan=TrainPlan(num_rounds=1, batch_size=8, target_epsilon=8.0),
                       out_dir=str(out), min_nodes=1)
    nodes = [
        NodeConfig(data_dir=federation / "data" / "site-1", epsilon_cap=8.0, site_name="site-1",
                   min_release_count=1),
        NodeConfig(data_dir=federation / "data" / "site-2", epsilon_cap=1.0, site_name="site-2",
                   min_release_count=1),
    ]
    report = run_simulation(config, nodes).to_dict()
    assert report["status"] == "completed" and "excluded" in report["reason"]
    assert report["final"]["auc_pooled"] is None  # these nodes did not allow histograms
    # The refusing node is left out of the rest of the run (on-refusal = "exclude").
    assert len(report["excluded"]) == 1 and "cap" in report["excluded"][0]["reason"]
    assert [s["site"] for s in report["final"]["sites"]] == ["site-1"]
    assert [s["site"] for s in report["sites"]] == ["site-1"]
    reasons = [e["reason"] for e in report["rounds"][0]["errors"] if e["phase"] == "train"]
    assert len(reasons) == 1 and "cap" in reasons[0]
