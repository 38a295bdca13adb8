"""Federated cross-validation of the non-binary tasks (:mod:`server.cv_tasks`).

Real ClientApps of two tiny synthetic hospitals behind an in-process grid (no Ray; the CLI and
its Ray simulation run in tests/cli/test_federation_cv_tasks.py); plus unit tests of the
summary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from common import messages as k
from common.config import NodeConfig, RunConfig, TrainPlan
from server.cv import FoldOutcome, run_cross_validation
from server.cv_tasks import HEADLINE, by_site, pooled_over_folds
from server.strategies.fedavg import RoundLog, SiteReply

torch.set_num_threads(1)

K = 3
PATIENTS = 60  # per site


def _federation(root: Path, task: str) -> Path:
    from client.dicom.synth_tasks import synthesize_task_federation

    synthesize_task_federation(root, task=task, num_classes=K if task != "regression" else None,
                               n_sites=2, patients_per_site=PATIENTS,
                               images_per_patient=(1, 2), image_size=16, seed=5)
    return root


@pytest.fixture(scope="module")
def ordinal_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _federation(tmp_path_factory.mktemp("cv-ordinal"), "ordinal")


@pytest.fixture(scope="module")
def regression_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _federation(tmp_path_factory.mktemp("cv-regression"), "regression")


def _nodes(root: Path, tmp_path: Path) -> dict[int, NodeConfig]:
    return {31 + i: NodeConfig(data_dir=root / f"site-{i + 1}", site_name=f"site-{i + 1}",
                               epsilon_cap=20.0, release_histograms=True, min_release_count=0,
                               ledger_dir=tmp_path / f"ledger-{i}", device="cpu")
            for i in range(2)}


def _config(out: Path, task: str) -> RunConfig:
    plan = TrainPlan(num_rounds=1, image_size=16, batch_size=16, seed=7, run_id=f"cv-{task}",
                     task=task, num_classes=K if task == "ordinal" else 2, target_epsilon=8.0)
    return RunConfig(plan=plan, out_dir=str(out), min_nodes=2)


def _node_patients(nodes: dict[int, NodeConfig], plan: TrainPlan) -> dict[str, int]:
    from client.app import _load

    out = {}
    for node in nodes.values():
        data = _load(node, plan)
        out[node.site_name] = data.train.num_patients + data.val.num_patients + \
            data.test.num_patients
    return out


def _heldout_sets(nodes: dict[int, NodeConfig], plan: TrainPlan,
                  num_folds: int) -> dict[str, list[set[bytes]]]:
    """Per site, each fold's held-out patients (identified by their first image's bytes)."""
    from dataclasses import replace

    from client.app import _load, heldout_split, training_split

    out: dict[str, list[set[bytes]]] = {}
    for node in nodes.values():
        data = _load(node, plan)
        sets = []
        for fold in range(num_folds):
            fold_plan = replace(plan, cv_mode="kfold", fold=fold, num_folds=num_folds)
            held = heldout_split(node, fold_plan, data, k.SPLIT_HELDOUT)
            train = training_split(node, fold_plan, data)
            ids = {_first_image(held, p) for p in range(held.num_patients)}
            assert not ids & {_first_image(train, p) for p in range(train.num_patients)}
            sets.append(ids)
        out[node.site_name] = sets
    return out


def _first_image(split: Any, patient: int) -> bytes:
    row = int(torch.nonzero(split.patient_index == patient)[0, 0])
    return bytes(split.images[row].numpy().tobytes())


def _assert_pooled_is_mean_of_folds(cv: dict[str, Any]) -> None:
    for name in cv["metrics"]:
        values = [row[name]["value"] for row in cv["folds"] if row[name] is not None]
        assert values, name
        pooled = cv["pooled"]
        assert pooled[name]["value"] == pytest.approx(np.mean(values), abs=1e-12)
        assert pooled[f"{name}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
        assert pooled[f"{name}_sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-12)
        assert pooled[name]["method"] == "mean over folds"


def test_ordinal_kfold_reports_kappa_per_fold_and_over_folds(tmp_path: Path,
                                                              ordinal_root: Path) -> None:
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare
    nodes = _nodes(ordinal_root, tmp_path)
    config = _config(tmp_path / "out", "ordinal")
    # Execute
    result = run_cross_validation(InProcessGrid(nodes), config, num_folds=2,
                                  leave_one_site_out=False)
    # Assert: every fold has its task section and the headline metric
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert cv["task"] == "ordinal" and cv["metric"] == "kappa_quadratic"
    assert cv["metrics"] == ["kappa_quadratic"] and cv["mode"] == "kfold"
    assert [row["fold"] for row in cv["folds"]] == [0, 1]
    for row, detail in zip(cv["folds"], cv["fold_details"], strict=True):
        section = detail["heldout_inference"]
        assert section["task"] == "ordinal" and section["split"] == k.SPLIT_HELDOUT
        assert section["status"] == "completed" and detail["errors"] == []
        assert row["kappa_quadratic"] == pytest.approx(section["ordinal"]["kappa_quadratic"])
        assert row["n"] == section["n"] > 0
        assert sorted(s["site"] for s in detail["heldout_by_site"]) == ["site-1", "site-2"]
        assert set(row["epsilon_by_site"]) == {"site-1", "site-2"}
    _assert_pooled_is_mean_of_folds(cv)
    # The folds are patient-disjoint and cover everyone: each patient is held out once.
    totals = _node_patients(nodes, config.plan)
    assert cv["pooled"]["n"] == sum(row["n"] for row in cv["folds"]) == sum(totals.values())
    for site, sets in _heldout_sets(nodes, config.plan, 2).items():
        assert not sets[0] & sets[1] and len(sets[0] | sets[1]) == totals[site]
    assert set(cv["by_site"]) == {"site-1", "site-2"}
    assert cv["by_site"]["site-1"]["kappa_quadratic"]["n_folds"] == 2
    # The fold's model is the task's: K - 1 cumulative logits.
    state = torch.load(tmp_path / "out" / "fold-0" / "checkpoints" / "final.pt")
    assert state["classifier.bias"].shape == (K - 1,)
    assert doc["inference"]["roc"] == {} and (tmp_path / "out" / "report.html").exists()
    html = (tmp_path / "out" / "report.html").read_text()
    assert "Cross-validation" in html and "kappa" in html.lower()


def test_regression_kfold_reports_mae_and_r2(tmp_path: Path, regression_root: Path) -> None:
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare
    nodes = _nodes(regression_root, tmp_path)
    config = _config(tmp_path / "out", "regression")
    # Execute
    result = run_cross_validation(InProcessGrid(nodes), config, num_folds=3,
                                  leave_one_site_out=False)
    # Assert
    cv = result.to_dict()["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert cv["metrics"] == ["mae", "r2"] and cv["lower_is_better"] == ["mae"]
    for row, detail in zip(cv["folds"], cv["fold_details"], strict=True):
        section = detail["heldout_inference"]
        assert section["task"] == "regression" and section["split"] == k.SPLIT_HELDOUT
        assert row["mae"]["value"] == pytest.approx(section["regression"]["mae"]["value"])
        assert row["mae"]["value"] >= 0 and row["r2"] is not None
    _assert_pooled_is_mean_of_folds(cv)
    totals = _node_patients(nodes, config.plan)
    assert cv["pooled"]["n"] == sum(row["n"] for row in cv["folds"]) == sum(totals.values())
    sets = _heldout_sets(nodes, config.plan, 3)
    for site, folds in sets.items():
        assert sum(len(s) for s in folds) == len(set().union(*folds)) == totals[site]
        assert max(len(s) for s in folds) - min(len(s) for s in folds) <= 1
    assert cv["by_site"]["site-2"]["mae"]["n_folds"] == 3


def test_ordinal_leave_one_site_out(tmp_path: Path, ordinal_root: Path) -> None:
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare: the nodes served in process (tests/cli/test_federation_cv_tasks.py runs the
    # same cross-validation through the CLI and a Ray simulation)
    nodes = _nodes(ordinal_root, tmp_path)
    config = _config(tmp_path / "out", "ordinal")
    # Execute
    result = run_cross_validation(InProcessGrid(nodes), config, num_folds=None,
                                  leave_one_site_out=True)
    # Assert: one fold per site, the held-out site is the only one evaluated
    cv = result.to_dict()["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert cv["mode"] == "loso" and [row["held_out"] for row in cv["folds"]] == \
        ["site-1", "site-2"]
    totals = _node_patients(_nodes(ordinal_root, tmp_path), config.plan)
    for row, detail in zip(cv["folds"], cv["fold_details"], strict=True):
        assert detail["heldout_inference"]["sites"] == [row["held_out"]]
        assert row["n"] == totals[row["held_out"]]
        assert set(detail["train_patients_by_site"]) == {"site-1", "site-2"} - {row["held_out"]}
        assert cv["by_site"][row["held_out"]]["kappa_quadratic"]["values"] == \
            [row["kappa_quadratic"]["value"]]
    _assert_pooled_is_mean_of_folds(cv)


@pytest.mark.slow
@pytest.mark.parametrize(("task", "model", "loso"), [
    ("multiclass", "cnn", False), ("multilabel", "cnn", False), ("segmentation", "unet", False),
    ("reconstruction", "autoencoder", True)])
def test_every_other_task_cross_validates_with_its_own_metric(
        tmp_path: Path, task: str, model: str, loso: bool) -> None:
    from tests.client.queries.fake_grid import InProcessGrid

    # Prepare: two hospitals of 40 patients
    if task == "segmentation":
        from client.dicom.synth_seg import synthesize_segmentation_federation

        synthesize_segmentation_federation(tmp_path / "data", n_sites=2, patients_per_site=40,
                                           images_per_patient=(1, 2), image_size=16, seed=3)
    else:
        from client.dicom.synth_tasks import synthesize_task_federation

        synthesize_task_federation(tmp_path / "data", task=task,
                                   num_classes=K if task != "reconstruction" else None,
                                   n_sites=2, patients_per_site=40, images_per_patient=(1, 2),
                                   image_size=16, seed=3)
    nodes = _nodes(tmp_path / "data", tmp_path)
    plan = TrainPlan(num_rounds=1, image_size=16, batch_size=16, seed=7, run_id=f"cv-{task}",
                     task=task, model=model, target_epsilon=8.0,
                     num_classes=K if task in ("multiclass", "multilabel") else 2)
    config = RunConfig(plan=plan, out_dir=str(tmp_path / "out"), min_nodes=2)
    # Execute
    result = run_cross_validation(InProcessGrid(nodes), config, num_folds=None if loso else 2,
                                  leave_one_site_out=loso)
    # Assert
    cv = result.to_dict()["inference"]["cv"]
    assert result.status == "completed", cv["fold_details"]
    assert cv["metrics"] == [m.name for m in HEADLINE[task]]
    for row, detail in zip(cv["folds"], cv["fold_details"], strict=True):
        section = detail["heldout_inference"]
        assert section["task"] == task and section["split"] == k.SPLIT_HELDOUT
        assert row[cv["metric"]]["value"] is not None and detail["errors"] == []
    _assert_pooled_is_mean_of_folds(cv)
    assert cv["pooled"]["n"] == sum(row["n"] for row in cv["folds"]) == 80
    assert set(cv["by_site"]) == {"site-1", "site-2"}


# --- unit tests of the summary -----------------------------------------------------------------


def _outcome(fold: int, task: str, values: dict[str, float | None], *, n: int = 10,
             label: str = "", per_site: list[dict[str, Any]] | None = None) -> FoldOutcome:
    out = FoldOutcome(fold=fold, label=label or f"fold-{fold}", run_id="r", directory=Path("."),
                      task=task, status="completed")
    out.summary = {"n": n, **{name: None if v is None else {"value": v} for name, v in
                              values.items()}}
    out.section = {task: {"per_site": per_site or []}}
    return out


def test_pooled_row_is_the_mean_and_sd_of_the_defined_folds() -> None:
    folds = [_outcome(0, "regression", {"mae": 1.0, "r2": 0.5}, n=10),
             _outcome(1, "regression", {"mae": 3.0, "r2": None}, n=12),
             _outcome(2, "regression", {"mae": 2.0, "r2": 0.1}, n=11)]
    pooled = pooled_over_folds(folds, "regression")
    assert pooled["n"] == 33 and pooled["folds_included"] == [0, 1, 2]
    assert pooled["mae"]["value"] == pooled["mae_mean"] == pytest.approx(2.0)
    assert pooled["mae_sd"] == pytest.approx(1.0)
    assert pooled["r2_mean"] == pytest.approx(0.3) and pooled["r2"]["n"] == 2
    assert pooled["r2_sd"] == pytest.approx(np.std([0.5, 0.1], ddof=1))


def test_by_site_uses_fold_metrics_for_loso_and_section_rows_for_kfold() -> None:
    loso = [_outcome(0, "ordinal", {"kappa_quadratic": 0.4}, label="a"),
            _outcome(1, "ordinal", {"kappa_quadratic": 0.6}, label="b")]
    sites = by_site(loso, "ordinal", "loso")
    assert sites["a"]["kappa_quadratic"]["values"] == [0.4]
    assert sites["b"]["kappa_quadratic"]["sd"] is None
    kfold = [_outcome(f, "ordinal", {"kappa_quadratic": 0.5},
                      per_site=[{"site": "a", "n": 5, "kappa_quadratic": 0.1 * (f + 1)},
                                {"site": "b", "n": 5, "kappa_quadratic": None}])
             for f in range(2)]
    sites = by_site(kfold, "ordinal", "kfold")
    assert sites["a"]["kappa_quadratic"]["mean"] == pytest.approx(0.15)
    assert sites["a"]["kappa_quadratic"]["folds"] == [0, 1] and "b" not in sites


def test_reconstruction_fold_loss_is_the_num_examples_weighted_mean() -> None:
    from server.cv_tasks import _reconstruction_section

    entry = RoundLog(round=0, evaluate=[
        SiteReply("a", 1, {k.NUM_EXAMPLES: 10, k.LOSS: 0.2}),
        SiteReply("b", 2, {k.NUM_EXAMPLES: 30, k.LOSS: 0.4})])
    section = _reconstruction_section(entry)
    assert section["status"] == "completed" and section["n"] == 40
    assert section["reconstruction"]["loss"]["value"] == pytest.approx(0.35)
    assert [r["site"] for r in section["reconstruction"]["per_site"]] == ["a", "b"]


def test_every_federated_task_but_binary_has_headline_metrics() -> None:
    assert set(HEADLINE) == {"multiclass", "ordinal", "multilabel", "regression",
                             "segmentation", "reconstruction"}
