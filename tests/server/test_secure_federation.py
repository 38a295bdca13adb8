"""run_federation with secure aggregation over three real in-process hospitals.

Prepare: three small synthetic hospitals behind the real ClientApp (DP training, the
secure-aggregation mod and stages). Execute: one round with ``secure-aggregation`` on and off.
Assert: a non-private round gives the same model both ways (training is seeded then), within
the quantisation bound; a DP run completes with the report's secure-aggregation section, the
securely pooled validation AUC, and per-site epsilon still reported.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import NodeConfig, RunConfig, TrainPlan
from common.secagg.encoding import quantisation_bound
from server.app import run_federation
from tests.client.queries.fake_grid import InProcessGrid

pytestmark = pytest.mark.slow  # three hospitals train for real (~30 s)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    path = tmp_path_factory.mktemp("fed3")
    synthesize_federation(path, n_sites=3, patients_per_site=30, images_per_patient=(1, 1),
                          image_size=16, seed=3)
    return path


def _nodes(root: Path, ledgers: Path) -> dict[int, NodeConfig]:
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"h{i + 1}",
                            release_histograms=True, min_release_count=1, device="cpu",
                            allow_non_private=True, epsilon_cap=50.0,
                            ledger_dir=ledgers / f"h{i + 1}")  # type: ignore[call-arg]
            for i, nid in enumerate((21, 22, 23))}


def _run(root: Path, out: Path, plan: TrainPlan, mode: str) -> dict[str, object]:
    config = RunConfig(plan=plan, out_dir=str(out), min_nodes=3, round_timeout=30,
                       secure_aggregation=mode)
    run_federation(InProcessGrid(_nodes(root, out / "ledgers")), config)
    return json.loads((out / "report.json").read_text())


def test_a_secure_round_trains_the_same_model_as_plain_fedavg(root: Path, tmp_path: Path) -> None:
    plan = TrainPlan(num_rounds=1, private=False, batch_size=16, image_size=16, seed=1)
    on = _run(root, tmp_path / "on", plan, "on")
    off = _run(root, tmp_path / "off", plan, "off")
    assert on["secure_aggregation"]["enabled"] and not off["secure_aggregation"]["enabled"]
    session = on["secure_aggregation"]["sessions"][0]
    assert session["status"] == "ok" and session["survivors"] == 3
    a = torch.load(tmp_path / "on" / "checkpoints" / "round-1.pt")
    b = torch.load(tmp_path / "off" / "checkpoints" / "round-1.pt")
    patients = sum(row["num_examples"] for row in off["sites"])  # type: ignore[union-attr]
    # Generous bits bound: the fewest fractional bits any 3-node plan gets is 8.
    for name in b:
        diff = (a[name].double() - b[name].double()).abs().max().item()
        assert diff <= quantisation_bound(3, 8) / max(patients, 1) + 1e-6, name
    # the pooled validation AUC comes from the securely summed histograms
    assert on["rounds"][0]["metrics"]["auc-pooled"] == pytest.approx(
        off["rounds"][0]["metrics"]["auc-pooled"], abs=1e-6)


def test_a_private_secure_run_completes_and_says_so(root: Path, tmp_path: Path) -> None:
    plan = TrainPlan(num_rounds=1, batch_size=16, image_size=16, seed=1, target_epsilon=8.0)
    doc = _run(root, tmp_path / "dp", plan, "auto")  # auto: 3 hospitals, so on
    assert doc["status"] == "completed"
    section = doc["secure_aggregation"]
    assert section["enabled"] and section["min_survivors"] == 3
    assert [(s["round"], s["phase"]) for s in section["sessions"]] == [
        (1, "train"), (1, "evaluate"), ("final", "evaluate")]
    assert doc["final"]["auc_pooled"] is not None  # from the securely summed test histograms
    assert all(s["status"] == "ok" for s in section["sessions"])
    assert all(0 < row["epsilon"] <= 8.0 + 1e-6 for row in doc["sites"])
    summary = (tmp_path / "dp" / "summary.txt").read_text()
    assert "secure aggregation: on (minimum survivors 3 of 3)" in summary
    assert "round 1 train: 3 survivors of 3; dropped: none" in summary


def test_hospital_level_dp_runs_inside_secure_aggregation(root: Path, tmp_path: Path) -> None:
    import dp_accounting

    plan = TrainPlan(num_rounds=1, batch_size=16, image_size=16, seed=1, target_epsilon=8.0)
    out = tmp_path / "hdp"
    config = RunConfig(plan=plan, out_dir=str(out), min_nodes=3, round_timeout=30,
                       hospital_dp_noise=1.0, hospital_dp_clip=0.5)
    run_federation(InProcessGrid(_nodes(root, out / "ledgers")), config)
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed" and doc["secure_aggregation"]["enabled"]
    hospital = doc["privacy"]["hospital_level"]
    assert hospital["releases"] == 1 and "securely aggregated" in hospital["mechanism"]
    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 1)
    assert hospital["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    # the round's checkpoint is written (the noised model) and is finite
    noised = torch.load(out / "checkpoints" / "round-1.pt")
    assert all(torch.isfinite(t).all() for t in noised.values() if t.is_floating_point())
