"""A ``dc-elm`` run is one federated closed-form readout round (server/elm_workflow.py).

The workflow runs against the real ClientApp of synthetic hospitals, called in-process
(:class:`tests.client.queries.fake_grid.InProcessGrid`): no Ray, no SuperLink.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.app import _load
from client.privacy_guard import NodeBudget
from common import messages as k
from common.config import NodeConfig, RunConfig, TrainPlan
from server.elm_workflow import WORKFLOW, run_elm_workflow
from server.strategies.fedavg import RoundLog
from tests.client.queries.fake_grid import InProcessGrid

NODE_IDS = (21, 22, 23)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("elm-fed")
    synthesize_federation(root, n_sites=3, patients_per_site=40, images_per_patient=(1, 3),
                          image_size=16, seed=3)
    return root


def _nodes(root: Path, ledgers: Path, **overrides: object) -> dict[int, NodeConfig]:
    settings: dict[str, object] = {"release_histograms": True, "min_release_count": 1,
                                   "device": "cpu", "epsilon_cap": 1000.0}
    settings.update(overrides)
    return {nid: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"site-{i + 1}",
                            ledger_dir=ledgers / f"site-{i + 1}",
                            **settings)  # type: ignore[arg-type]
            for i, nid in enumerate(NODE_IDS)}


def _config(out: Path, *, private: bool) -> RunConfig:
    plan = TrainPlan(model="dc-elm", image_size=16, private=private, run_id="elm-test")
    return RunConfig(plan=plan, out_dir=str(out), min_nodes=3, round_timeout=30)


def _readout_entries(node: NodeConfig, plan: TrainPlan, level: str = "patient") -> list[Any]:
    """The node's ledger entries of the readout release, at one privacy level."""
    ledger = NodeBudget.for_node(node).ledger
    entries = ledger.entries(_load(node, plan).fingerprint, level=level)
    return [e for e in entries if e.release == "query:elm-readout"]


def test_a_non_private_readout_completes_with_a_high_pooled_auc(data_root: Path,
                                                                 tmp_path: Path) -> None:
    # Prepare: hospitals that release exact sums for baselines they consent to
    nodes = _nodes(data_root, tmp_path / "ledgers", allow_non_private=True)
    config = _config(tmp_path / "run", private=False)
    seen: list[RoundLog] = []
    # Execute
    report = run_elm_workflow(InProcessGrid(nodes), config, on_round=seen.append)
    # Assert: completed; one round with validation metrics; a readout that separates lesions
    assert report.status == "completed", report.reason
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert len(doc["rounds"]) == 1 and len(seen) == 1
    assert len(doc["rounds"][0]["train"]) == 3 and len(doc["rounds"][0]["sites"]) == 3
    assert doc["final"]["auc_pooled"] > 0.8
    assert len(doc["final"]["sites"]) == 3
    inference = doc["inference"]
    assert inference["status"] == "completed", inference
    workflow = doc["workflow"]
    assert workflow["name"] == WORKFLOW and workflow["nodes"] == 3
    assert workflow["features"] == 16 * 4 * 4 + 1 and not workflow["noised"]
    assert workflow["ridge_used"] == workflow["ridge"]
    assert doc["privacy"]["guarantee"].startswith("none")
    assert (tmp_path / "run" / "report.html").stat().st_size > 0
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert final["readout.weight"].abs().sum() > 0  # the initial readout was replaced
    for node in nodes.values():  # the exact release is on every ledger, at level "exact"
        assert len(_readout_entries(node, config.plan, "exact")) == 1
        assert _readout_entries(node, config.plan) == []


def test_a_private_readout_is_noised_charged_and_reported_per_site(data_root: Path,
                                                                    tmp_path: Path) -> None:
    # Prepare: hospitals that noise every statistic (sigma = 1 x sensitivity); the readout, a
    # training release, takes the plan's noise instead (target epsilon 8)
    nodes = _nodes(data_root, tmp_path / "ledgers", stats_noise_multiplier=1.0)
    config = _config(tmp_path / "run", private=True)
    # Execute
    report = run_elm_workflow(InProcessGrid(nodes), config)
    # Assert: completed, every hospital charged one Gaussian release for it
    assert report.status == "completed", report.reason
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    workflow = doc["workflow"]
    assert workflow["noised"] and sorted(workflow["noised_sites"]) == [
        "site-1", "site-2", "site-3"]
    assert workflow["ridge_used"] > workflow["ridge"]  # raised above the noise
    for node in nodes.values():
        entries = _readout_entries(node, config.plan)
        assert len(entries) == 1
        mech = entries[0].mechanism
        assert mech.kind == "gaussian" and mech.steps == 1
        assert mech.noise_multiplier == pytest.approx(_plan_sigma(entries[0].delta))
    # epsilon per site, from the nodes' replies, where the privacy section reads it
    sites = {row["site"]: row for row in doc["sites"]}
    assert sorted(sites) == ["site-1", "site-2", "site-3"]
    assert all(row["epsilon"] is not None and 0 < row["epsilon"] < 1000 for row in sites.values())
    assert all(row["ledger_head"] for row in sites.values())
    assert "Gaussian mechanism" in doc["privacy"]["mechanism"]
    html = (tmp_path / "run" / "report.html").read_text()
    assert "no DP-SGD" in html and "one Gaussian step" in html  # the review board reads how
    assert "site-1" in html and "ε" in html
    # Noised sums of ~170 training images still give a usable readout on this easy data.
    assert doc["final"]["auc_pooled"] > 0.6


def _plan_sigma(delta: float) -> float:
    """The composed mechanism's multiplier of one readout at the plan's target epsilon (8)."""
    from common.privacy import plan_noise_multiplier

    return plan_noise_multiplier(target_epsilon=8.0, delta=delta, sample_rate=1.0, steps=1)


def test_a_private_plan_noises_the_readout_at_hospitals_without_statistics_noise(
    data_root: Path, tmp_path: Path
) -> None:
    # Prepare: hospitals that release their held-out statistics exactly, a private plan
    nodes = _nodes(data_root, tmp_path / "ledgers")
    config = _config(tmp_path / "run", private=True)
    # Execute
    report = run_elm_workflow(InProcessGrid(nodes), config)
    # Assert: the training sums were noised by the plan and charged at level "patient" (epsilon
    # within the plan's target), never released exactly; the run completes
    assert report.status == "completed", report.reason
    for node in nodes.values():
        assert _readout_entries(node, config.plan, "exact") == []
        (entry,) = _readout_entries(node, config.plan)
        assert entry.mechanism.noise_multiplier == pytest.approx(_plan_sigma(entry.delta))
    doc = json.loads((tmp_path / "run" / "report.json").read_text())
    assert all(0 < row["epsilon"] <= 8.0 + 1e-6 for row in doc["sites"])


def test_stop_on_refusal_stops_the_run(data_root: Path, tmp_path: Path) -> None:
    # hospitals that do not consent to non-private baselines refuse an exact readout
    nodes = _nodes(data_root, tmp_path / "ledgers")
    config = _config(tmp_path / "run", private=False)
    config = RunConfig(plan=config.plan, out_dir=config.out_dir, min_nodes=3,
                       round_timeout=30, on_refusal="stop")
    report = run_elm_workflow(InProcessGrid(nodes), config)
    assert report.status == "stopped" and "refused the readout" in report.reason


def test_too_few_nodes_fail_before_anything_is_asked(data_root: Path, tmp_path: Path) -> None:
    nodes = _nodes(data_root, tmp_path / "ledgers", allow_non_private=True)
    config = RunConfig(plan=_config(tmp_path, private=False).plan, out_dir=str(tmp_path / "run"),
                       min_nodes=4, round_timeout=0.1)
    grid = InProcessGrid(nodes)
    report = run_elm_workflow(grid, config)
    assert report.status == "failed" and "min-nodes=4" in report.reason
    assert grid.sent == []


def test_hospital_level_dp_is_refused_rather_than_silently_dropped(data_root: Path,
                                                                  tmp_path: Path) -> None:
    nodes = _nodes(data_root, tmp_path / "ledgers", allow_non_private=True)
    base = _config(tmp_path / "run", private=False)
    config = RunConfig(plan=base.plan, out_dir=base.out_dir, min_nodes=3,
                       hospital_dp_noise=1.0, hospital_dp_clip=1.0)
    grid = InProcessGrid(nodes)
    report = run_elm_workflow(grid, config)
    assert report.status == "failed" and "hospital-level DP" in report.reason
    assert grid.sent == []


def test_workflow_readout_matches_a_pooled_ridge_fit(data_root: Path, tmp_path: Path) -> None:
    """The final model's readout is the ridge solution on all hospitals' clipped rows."""
    from client.app import training_split
    from common.models import build_model
    from server.elm_workflow import DEFAULT_CLIP, DEFAULT_RIDGE

    nodes = _nodes(data_root, tmp_path / "ledgers", allow_non_private=True)
    config = _config(tmp_path / "run", private=False)
    report = run_elm_workflow(InProcessGrid(nodes), config)
    assert report.status == "completed", report.reason
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    model = build_model("dc-elm", in_channels=1, num_classes=2, image_size=16)
    hth, hty = 0.0, 0.0
    for node in nodes.values():
        split = training_split(node, config.plan, _load(node, config.plan))
        a, b, _ = model.readout_statistics(  # type: ignore[operator]
            split.images, split.labels, clip=DEFAULT_CLIP, patient_index=split.patient_index)
        hth, hty = hth + a, hty + b
    beta = model.solve_readout(hth, hty, DEFAULT_RIDGE)  # type: ignore[operator]
    np.testing.assert_allclose(final["readout.weight"].double().numpy(), beta.T.numpy(),
                               rtol=1e-4, atol=1e-6)
    assert k.AUC_POOLED in report.final.evaluate_metrics  # type: ignore[union-attr]


def test_a_multiclass_readout_has_one_output_per_class(tmp_path: Path) -> None:
    from tests.server.multiclass_federation import write_three_class_federation

    # Prepare: three classes (the coordinator's solve builds the plan's K outputs)
    write_three_class_federation(tmp_path / "data", n_sites=3, patients_per_site=60,
                                 image_size=16)
    nodes = _nodes(tmp_path / "data", tmp_path / "ledgers", allow_non_private=True)
    plan = TrainPlan(model="dc-elm", image_size=16, private=False, task="multiclass",
                     num_classes=3, run_id="elm-mc")
    config = RunConfig(plan=plan, out_dir=str(tmp_path / "run"), min_nodes=3, round_timeout=30)
    # Execute
    report = run_elm_workflow(InProcessGrid(nodes), config)
    # Assert
    assert report.status == "completed", report.reason
    final = torch.load(tmp_path / "run" / "checkpoints" / "final.pt", weights_only=True)
    assert tuple(final["readout.weight"].shape) == (3, 257)
    inference = report.extra["inference"]
    assert inference["task"] == "multiclass" and inference["status"] == "completed"
    assert inference["multiclass"]["auc"]["macro"]["value"] > 0.7
