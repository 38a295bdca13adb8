"""`federation cv --paradigm ensemble` through the CLI on tiny synthetic hospitals (2 sites,
2 folds, 2 members, 1 round, 16 px): each fold's held-out AUC is the ensemble's (checked
against sklearn on the averaged probabilities of the fold's member checkpoints), every
member of every fold is on every node's ledger; the cv refusals of weighted, stacker and
bagging."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger

SITES, PATIENTS, SIZE, FOLDS, MEMBERS = 2, 16, 16, 2, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("cve")
    synthesize_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                          images_per_patient=(1, 2), image_size=SIZE, seed=1)
    return root


def _cv(data: Path, out: Path, *args: str) -> dict[str, Any]:
    result = CliRunner().invoke(app, [
        "federation", "cv", "--data-root", str(data), "--folds", str(FOLDS), "--rounds", "1",
        "--image-size", str(SIZE), "--min-release-count", "1", "--batch-size", "8",
        "--epsilon", "4", "--ledger-dir", str(out / "ledgers"), "--out", str(out), *args],
        terminal_width=300, env={"COLUMNS": "300"})
    assert result.exit_code == 0, result.output[-3000:]
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    return doc


def _heldout_ensemble_scores(demo: Path, out: Path, fold: int) -> tuple[np.ndarray, np.ndarray]:
    """Per held-out patient of ``fold`` (both sites): the members' averaged probability of
    class 1 (each patient's images averaged, as the nodes do) and the patient's label."""
    import torch

    from client.app import build_plan_model
    from client.data.folds import cv_splits
    from client.data.task_data import load_task_data
    from common.config import TrainPlan

    plan = TrainPlan(cv_mode="kfold", fold=fold, num_folds=FOLDS, seed=42, image_size=SIZE)
    models = []
    for i in range(MEMBERS):
        model = build_plan_model(plan)
        model.load_state_dict(torch.load(out / f"fold-{fold}" / f"member-{i}" / "checkpoints"
                                         / "final.pt", weights_only=True))
        models.append(model.eval())
    scores, labels = [], []
    for s in range(1, SITES + 1):
        site = demo / f"site-{s}"
        held = cv_splits(load_task_data(site, image_size=SIZE), plan=plan,
                         site_name=site.name)[1]
        index = held.patient_index.numpy()
        counts = np.bincount(index)
        with torch.no_grad():
            per_member = [np.bincount(index, weights=torch.softmax(m(held.images), dim=1)[:, 1]
                                      .double().numpy()) / counts for m in models]
        scores.append(np.mean(per_member, axis=0))
        labels.append(np.bincount(index, weights=held.labels.numpy().astype(float)) / counts)
    return np.concatenate(scores), np.rint(np.concatenate(labels)).astype(int)


@pytest.mark.slow
def test_ensemble_cross_validation_evaluates_the_ensemble(demo: Path, tmp_path: Path) -> None:
    from sklearn.metrics import roc_auc_score

    from server.paradigms.cv_ensemble import CV_SCORE_BINS

    # Execute
    out = tmp_path / "ens"
    doc = _cv(demo, out, "--paradigm", "ensemble", "-P", f"members={MEMBERS}")
    # Assert: every fold completed, its AUC that of the members' averaged probabilities
    cv = doc["inference"]["cv"]
    assert [f["status"] for f in cv["folds"]] == ["completed"] * FOLDS
    for fold in range(FOLDS):
        scores, labels = _heldout_ensemble_scores(demo, out, fold)
        assert cv["folds"][fold]["n"] == len(labels)
        binned = np.clip(np.floor(scores * CV_SCORE_BINS), 0, CV_SCORE_BINS - 1)  # ties: 1/2
        expected = roc_auc_score(labels, binned)
        assert cv["folds"][fold]["auc"]["value"] == pytest.approx(expected, abs=1e-9)
    assert cv["pooled"]["n"] == sum(f["n"] for f in cv["folds"]) == SITES * PATIENTS
    assert cv["pooled"]["auc"]["value"] is not None
    section = doc["paradigm"]
    assert section["name"] == "ensemble" and section["options"]["members"] == MEMBERS
    assert any("held-out figures of every fold are the ensemble's" in n
               for n in section["notes"])
    # Every node's ledger: one training entry per member per fold, under the member's run id
    run_ids = [d["run_id"] for d in cv["fold_details"]]
    for s in range(1, SITES + 1):
        records = Ledger(out / "ledgers" / f"site-{s}" / "ledger.jsonl").read().records
        entries = [r.entry for r in records if r.entry.release == "train"]
        assert sorted((e.fold, e.run_id) for e in entries) == sorted(
            (f, f"{run_ids[f]}-member-{i}") for f in range(FOLDS) for i in range(MEMBERS))
        assert all(e.params["paradigm"] == "supervised" for e in entries)
    for row in cv["folds"]:  # the members' spends add up to at most the run's ε
        assert all(0 < eps <= 4.0 + 1e-6 for eps in row["epsilon_by_site"].values())


@pytest.mark.parametrize(("option", "match"), [
    ("combine=weighted", "combine=weighted is not available in federation cv"),
    ("combine=stacker", "combine=stacker is not available in federation cv"),
    ("method=bagging", "method=bagging is not available in federation cv"),
])
def test_ensemble_cross_validation_refuses_what_a_fold_cannot_run(option: str,
                                                                  match: str) -> None:
    from common.config import RunConfig, TrainPlan
    from common.errors import ConfigError
    from common.paradigms import canonical_options, get_paradigm, parse_option_pairs
    from server.paradigms.cv_ensemble import run_ensemble_fold

    options = parse_option_pairs(get_paradigm("ensemble"), [option])
    config = RunConfig(plan=TrainPlan(paradigm="ensemble",
                                      paradigm_options=canonical_options(options)))
    with pytest.raises(ConfigError, match=match):
        run_ensemble_fold(None, config, None, train_nodes=None,  # type: ignore[arg-type]
                          heldout_nodes=None, progress=None, num_folds=2)
