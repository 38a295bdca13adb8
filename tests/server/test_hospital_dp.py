"""Hospital-level DP: Flower's server-side fixed clipping around our FedAvg, accounted."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from common.config import RunConfig, TrainPlan
from server.app import run_federation
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import image_nodes

PLAN = TrainPlan(num_rounds=2, batch_size=16, target_epsilon=8.0, image_size=16, seed=1)


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed")


def _run(root: Path, out: Path, ledgers: Path, **dp: float) -> dict[str, object]:
    nodes = image_nodes(root, epsilon_cap=50.0, ledger_dir=ledgers)
    config = RunConfig(plan=PLAN, out_dir=str(out), min_nodes=2, round_timeout=30, **dp)
    report = run_federation(InProcessGrid(nodes), config)
    doc: dict[str, object] = json.loads((out / "report.json").read_text())
    assert doc["status"] == report.status  # what was returned is what was written
    return doc


def test_hospital_level_dp_is_applied_accounted_and_reported(root: Path, tmp_path: Path) -> None:
    doc = _run(root, tmp_path / "dp", tmp_path / "l1", hospital_dp_noise=1.0,
               hospital_dp_clip=0.5, hospital_dp_delta=1e-3)
    assert doc["status"] == "completed"
    hospital = doc["privacy"]["hospital_level"]
    assert hospital["releases"] == 2 and hospital["noise_multiplier"] == 1.0
    assert 0 < hospital["epsilon"] < math.inf and hospital["delta"] == 1e-3
    # Two releases of a Gaussian mechanism with multiplier 1 (no amplification) compose to
    # the RDP epsilon that dp-accounting gives directly.
    import dp_accounting

    acc = dp_accounting.rdp.RdpAccountant()
    acc.compose(dp_accounting.GaussianDpEvent(1.0), 2)
    assert hospital["epsilon"] == pytest.approx(acc.get_epsilon(1e-3), rel=1e-6)
    # Patient-level DP is still reported per site, beside it.
    assert all(0 < s["epsilon"] <= 8.0 + 1e-6 for s in doc["sites"])
    # Checkpoints hold the noised model: the final checkpoint is the selected round's (the
    # best validation AUC, which the noise makes round 1 or 2).
    chosen = doc["model_selection"]["final_round"]  # type: ignore[index]
    picked = torch.load(tmp_path / "dp" / "checkpoints" / f"round-{chosen}.pt")
    final = torch.load(tmp_path / "dp" / "checkpoints" / "final.pt")
    assert all(torch.equal(picked[name], final[name]) for name in picked)


def test_without_hospital_dp_the_report_says_none(root: Path, tmp_path: Path) -> None:
    doc = _run(root, tmp_path / "plain", tmp_path / "l2")
    assert doc["status"] == "completed" and doc["privacy"]["hospital_level"] is None


def test_hospital_dp_needs_a_clipping_norm() -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="hospital-dp-clip"):
        RunConfig(plan=dataclasses.replace(PLAN), hospital_dp_noise=1.0)
