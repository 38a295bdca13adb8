"""`federation cv --paradigm semi-supervised|transfer|self-supervised` through the CLI on tiny
synthetic hospitals (2 sites, 2 folds, 1 round, 16 px): per-fold held-out results, every
training patient (labelled, hidden-label and unlabelled) and every stage on every node's
ledger per fold, and self-supervised's refusal."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger
from tests.cli.paradigms import partly_labelled_federation

SITES, PATIENTS, SIZE, FOLDS = 2, 16, 16, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hospitals; site-2's labels.csv lacks a quarter of its rows (unlabelled patients)."""
    return partly_labelled_federation(tmp_path_factory.mktemp("cvp"), sites=SITES,
                                      patients=PATIENTS, size=SIZE)


def _invoke(data: Path, out: Path, *args: str) -> Any:
    return CliRunner().invoke(app, [
        "federation", "cv", "--data-root", str(data), "--folds", str(FOLDS), "--rounds", "1",
        "--image-size", str(SIZE), "--min-release-count", "1", "--batch-size", "8",
        "--epsilon", "4", "--ledger-dir", str(out / "ledgers"), "--out", str(out), *args],
        terminal_width=300, env={"COLUMNS": "300"})


def _cv(data: Path, out: Path, *args: str) -> dict[str, Any]:
    result = _invoke(data, out, *args)
    assert result.exit_code == 0, result.output[-3000:]
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    return doc


def _labelled(site: Path) -> int:
    from client.data.task_data import load_task_data

    data = load_task_data(site, image_size=SIZE)
    return data.train.num_patients + data.val.num_patients + data.test.num_patients


def _fold_train_patients(site: Path, fold: int) -> int:
    """The labelled patients ``site`` trains on in ``fold`` (its CV split, seed 42)."""
    from client.data.folds import cv_splits
    from client.data.task_data import load_task_data
    from common.config import TrainPlan

    plan = TrainPlan(cv_mode="kfold", fold=fold, num_folds=FOLDS, seed=42, image_size=SIZE)
    return cv_splits(load_task_data(site, image_size=SIZE), plan=plan,
                     site_name=site.name)[0].num_patients


def _train_entries(out: Path, site: str) -> list[Any]:
    records = Ledger(out / "ledgers" / site / "ledger.jsonl").read().records
    return [r.entry for r in records if r.entry.release == "train"]


def _assert_folds(doc: dict[str, Any], demo: Path) -> None:
    """Both folds completed with a held-out AUC; every labelled patient held out once."""
    cv = doc["inference"]["cv"]
    assert [f["fold"] for f in cv["folds"]] == list(range(FOLDS))
    assert all(f["status"] == "completed" and f["auc"]["value"] is not None
               for f in cv["folds"])
    labelled = sum(_labelled(demo / f"site-{i}") for i in range(1, SITES + 1))
    assert cv["pooled"]["n"] == sum(f["n"] for f in cv["folds"]) == labelled


@pytest.mark.slow
def test_semi_supervised_cross_validation(demo: Path, tmp_path: Path) -> None:
    from client.data.task_data import load_unlabelled

    # Execute
    out = tmp_path / "semi"
    doc = _cv(demo, out, "--paradigm", "semi-supervised", "-P", "labelled-fraction=0.5")
    # Assert: per-fold results over the labelled patients only (unlabelled ones never held out)
    _assert_folds(doc, demo)
    section = doc["paradigm"]
    assert section["name"] == "semi-supervised"
    assert section["options"]["labelled-fraction"] == 0.5
    assert any("never in a held-out part" in n for n in section["notes"])
    # each fold's ledger entry counts the fold's labelled training patients plus the node's
    # unlabelled ones (site-2 has some), under the fold's run id
    unlabelled = {f"site-{i}": load_unlabelled(demo / f"site-{i}", image_size=SIZE).num_patients
                  for i in range(1, SITES + 1)}
    assert unlabelled["site-2"] > 0
    run_ids = [d["run_id"] for d in doc["inference"]["cv"]["fold_details"]]
    for site, extra in unlabelled.items():
        entries = _train_entries(out, site)
        assert sorted(e.fold for e in entries) == list(range(FOLDS))
        for e in entries:
            assert e.run_id == run_ids[e.fold]
            assert e.dataset_size == _fold_train_patients(demo / site, e.fold) + extra
        assert all(0 < eps <= 4.0 for f in doc["inference"]["cv"]["folds"]
                   for eps in f["epsilon_by_site"].values())


@pytest.mark.slow
def test_transfer_cross_validation_pretrains_per_fold(demo: Path, tmp_path: Path) -> None:
    import hashlib

    from client.data.task_data import load_unlabelled

    # Execute: per fold, one round of rotation pretraining, then one of fine-tuning
    out = tmp_path / "tl"
    doc = _cv(demo, out, "--paradigm", "transfer", "-P", "pretrain-rounds=1",
              "-P", "freeze=trunk")
    # Assert: per-fold held-out results of the fine-tuned models; the paradigm's notes
    _assert_folds(doc, demo)
    section = doc["paradigm"]
    assert section["name"] == "transfer" and section["options"]["pretrain-rounds"] == 1
    assert any("scratch arm is not run" in n for n in section["notes"])
    details = doc["inference"]["cv"]["fold_details"]
    encoders = [out / f"fold-{f}" / "pretrain" / "checkpoints" / "encoder.pt"
                for f in range(FOLDS)]
    hashes = [hashlib.sha256(p.read_bytes()).hexdigest() for p in encoders]
    assert all(hashes[f] in " ".join(details[f]["notes"]) for f in range(FOLDS))
    fold_doc = json.loads((out / "fold-0" / "report.json").read_text())
    assert fold_doc["init_from"]["sha256"] == hashes[0]
    # Every node's ledger: per fold a pretraining entry (its run id, the fold's training
    # patients plus its unlabelled ones) and a fine-tuning entry (the fold's run id, the
    # fold's labelled training patients, the encoder's hash)
    for i in range(1, SITES + 1):
        site = f"site-{i}"
        extra = load_unlabelled(demo / site, image_size=SIZE).num_patients
        entries = _train_entries(out, site)
        assert len(entries) == 2 * FOLDS
        for fold in range(FOLDS):
            mine = {e.run_id: e for e in entries if e.fold == fold}
            run_id = details[fold]["run_id"]
            assert set(mine) == {run_id, f"{run_id}-pretrain"}
            pre, fine = mine[f"{run_id}-pretrain"], mine[run_id]
            patients = _fold_train_patients(demo / site, fold)
            assert pre.params["paradigm"] == "self-supervised-rounds"
            assert pre.dataset_size == patients + extra
            assert fine.params["paradigm"] == "fine-tune-rounds"
            assert fine.dataset_size == patients
            assert json.loads(fine.params["paradigm_options"]) == {
                "freeze": "trunk", "init-sha256": hashes[fold]}
    for row in doc["inference"]["cv"]["folds"]:  # both stages: ε within the run's target
        assert all(0 < eps <= 4.0 + 1e-6 for eps in row["epsilon_by_site"].values())


@pytest.mark.slow
def test_self_supervised_cross_validation_judges_the_encoder_by_a_linear_probe(
    demo: Path, tmp_path: Path
) -> None:
    import torch

    # Execute: per fold one masked-patch pretext round, then one linear-probe round
    out = tmp_path / "ssl"
    doc = _cv(demo, out, "--paradigm", "self-supervised", "-P", "pretext=masked")
    # Assert: per-fold held-out results of the probes; the probe left the encoder as it was
    _assert_folds(doc, demo)
    section = doc["paradigm"]
    assert section["name"] == "self-supervised" and section["options"]["pretext"] == "masked"
    assert any("linear probe" in n for n in section["notes"])
    assert not any("scratch arm" in n for n in section["notes"])
    encoder = torch.load(out / "fold-0" / "pretrain" / "checkpoints" / "encoder.pt",
                         weights_only=True)
    probe = torch.load(out / "fold-0" / "checkpoints" / "final.pt", weights_only=True)
    assert all(torch.allclose(probe[name], t, atol=1e-5) for name, t in encoder.items())
    details = doc["inference"]["cv"]["fold_details"]
    for i in range(1, SITES + 1):
        entries = _train_entries(out, f"site-{i}")
        assert sorted((e.fold, e.params["paradigm"]) for e in entries) == sorted(
            (f, p) for f in range(FOLDS)
            for p in ("self-supervised-rounds", "fine-tune-rounds"))
        assert {e.run_id for e in entries} == {
            rid for d in details for rid in (d["run_id"], f"{d['run_id']}-pretrain")}
    for row in doc["inference"]["cv"]["folds"]:
        assert all(0 < eps <= 4.0 + 1e-6 for eps in row["epsilon_by_site"].values())


def test_self_supervised_cross_validation_refuses_init_from(tmp_path: Path) -> None:
    from common.config import RunConfig, TrainPlan
    from common.errors import ConfigError
    from server.paradigms.cv_self_supervised import run_self_supervised_fold

    config = RunConfig(plan=TrainPlan(paradigm="self-supervised"), init_from="x.pt")
    with pytest.raises(ConfigError, match="drop --init-from"):
        run_self_supervised_fold(None, config, None, train_nodes=None,  # type: ignore[arg-type]
                                 heldout_nodes=None, progress=None, num_folds=2)
