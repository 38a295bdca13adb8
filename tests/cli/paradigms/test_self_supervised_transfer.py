"""`federation run --paradigm self-supervised|transfer` through the CLI on tiny synthetic
hospitals (2 sites, 1 round, 16 px): the encoder checkpoint and its hash, its tensors loaded
by a transfer run, both arms of a transfer run with ε per hospital, every arm on every node's
ledger, and the refusals of plans these paradigms cannot run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger

SITES, PATIENTS, SIZE = 2, 16, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("ssl")
    synthesize_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                          images_per_patient=(1, 2), image_size=SIZE, seed=1)
    return root


def _invoke(data: Path, out: Path, *args: str) -> Any:
    return CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--batch-size", "8", "--epsilon", "2",
        "--ledger-dir", str(out / "ledgers"), "--out", str(out), *args],
        terminal_width=300, env={"COLUMNS": "300"})


def _run(data: Path, out: Path, *args: str) -> dict[str, Any]:
    result = _invoke(data, out, *args)
    assert result.exit_code == 0, result.output[-3000:]
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    return doc


def _train_runs(ledgers: Path) -> dict[str, set[str]]:
    """Site -> run ids of its ledger's training entries."""
    return {d.name: {r.entry.run_id for r in Ledger(d / "ledger.jsonl").read().records
                     if r.entry.release == "train"}
            for d in sorted(ledgers.iterdir()) if (d / "ledger.jsonl").is_file()}


@pytest.mark.slow
def test_self_supervised_writes_an_encoder_that_a_transfer_run_loads(
    demo: Path, tmp_path: Path
) -> None:
    # Execute: masked-patch pretraining
    out = tmp_path / "ssl"
    doc = _run(demo, out, "--paradigm", "self-supervised", "-P", "pretext=masked")
    # Assert: the encoder (no output layer) and its hash in the paradigm section
    encoder = out / "checkpoints" / "encoder.pt"
    section = doc["paradigm"]
    assert section["name"] == "self-supervised" and section["options"]["pretext"] == "masked"
    assert section["encoder"]["sha256"] == hashlib.sha256(encoder.read_bytes()).hexdigest()
    tensors = torch.load(encoder, weights_only=True)
    assert tensors and not any(name.startswith("classifier.") for name in tensors)
    assert "inference" not in doc
    loss = section["plots"][0]["series"]["pretext"]
    assert len(loss) == 1 and loss[0] is not None and loss[0] > 0
    runs = _train_runs(out / "ledgers")
    assert len(runs) == SITES and all(ids == {doc["config"]["run-id"]} for ids in runs.values())
    assert all(0 < s["epsilon"] <= 2.0 for s in doc["sites"])
    # Execute: fine-tune from it, frozen trunk, no scratch arm
    out2 = tmp_path / "tl"
    doc2 = _run(demo, out2, "--paradigm", "transfer", "-P", f"pretrained={encoder}",
                "-P", "freeze=trunk", "-P", "compare-scratch=false")
    # Assert: every encoder tensor loaded, the hash recorded, the trunk left as pretrained
    pre = doc2["paradigm"]["pretrained"]
    assert pre["sha256"] == section["encoder"]["sha256"]
    assert pre["tensors_loaded"] == len(tensors) and pre["tensors_skipped"] == 0
    final = torch.load(out2 / "checkpoints" / "final.pt", weights_only=True)
    # (FedAvg of identical frozen tensors: equal to float rounding; a DP step moves them far more)
    assert all(torch.allclose(final[name], t, atol=1e-5) for name, t in tensors.items())
    assert [row[0] for row in doc2["paradigm"]["tables"][0]["rows"]] == ["transfer"]


@pytest.mark.slow
def test_transfer_with_in_run_pretraining_compares_with_scratch_at_the_same_epsilon(
    demo: Path, tmp_path: Path
) -> None:
    # Execute: contrastive pretraining (1 round), fine-tuning and the scratch arm
    out = tmp_path / "out"
    doc = _run(demo, out, "--paradigm", "transfer", "-P", "pretrain-rounds=1",
               "-P", "pretext=contrastive", "-P", "views=2", "-P", "freeze=block1")
    # Assert: both arms with the headline metric and ε per hospital
    section = doc["paradigm"]
    arms, privacy = section["tables"]
    assert [row[0] for row in arms["rows"]] == ["transfer", "scratch"]
    assert len(arms["columns"]) == 2 + SITES
    for row in arms["rows"]:
        assert row[1] is not None and 0 <= row[1] <= 1
        assert all(e is not None and 0 < e <= 2.0 + 1e-6 for e in row[2:])  # same target ε
    for site, pre_e, fine_e, scratch_e, total in privacy["rows"]:
        assert 0 < pre_e <= 1.0 + 1e-6 and 0 < fine_e <= 1.0 + 1e-6 and 0 < scratch_e <= 2.0
        assert total >= max(pre_e, fine_e, scratch_e)
    assert set(section["plots"][0]["series"]) == {"transfer", "scratch"}
    assert (out / "checkpoints" / "encoder.pt").is_file()
    assert (out / "checkpoints" / "final.pt").is_file()
    assert doc["inference"]["status"] == "completed"
    # every arm is on every node's ledger under its own run id
    run_id = doc["config"]["run-id"]
    expected = {f"{run_id}-{stage}" for stage in ("pretrain", "transfer", "scratch")}
    runs = _train_runs(out / "ledgers")
    assert len(runs) == SITES and all(ids == expected for ids in runs.values())
    assert "transfer vs scratch" in (out / "summary.txt").read_text()
    # the fine-tuning entries record the federated-pretrained encoder's SHA-256
    sha = hashlib.sha256((out / "checkpoints" / "encoder.pt").read_bytes()).hexdigest()
    for folder in (out / "ledgers").iterdir():
        fine = [r.entry for r in Ledger(folder / "ledger.jsonl").read().records
                if r.entry.release == "train" and r.entry.run_id == f"{run_id}-transfer"]
        assert fine and all(json.loads(e.params["paradigm_options"])["init-sha256"] == sha
                            for e in fine)


@pytest.mark.parametrize(("args", "message"), [
    (["--paradigm", "transfer", "--model", "mlp", "-P", "pretrain-rounds=1"],
     "trunk/head split"),
    (["--paradigm", "self-supervised", "--model", "mlp"], "trunk/head split"),
    (["--paradigm", "self-supervised", "--model", "resnet", "--samples", "volume-3d"],
     "serve image-2d samples"),
    (["--paradigm", "transfer"], "needs pretrained weights"),
    (["--paradigm", "transfer", "-P", "pretrained=/no/such.pt"], "no such file"),
    (["--paradigm", "transfer", "-P", "pretrain-rounds=1", "-P", "freeze=trunk,head"],
     "nothing would be trained"),
    (["--paradigm", "transfer", "-P", "pretrain-rounds=1", "-P", "freeze=layer9"],
     "no layer group"),
    (["--paradigm", "self-supervised", "-P", "pretext=jigsaw"], "pretext must be one of"),
])
def test_plans_these_paradigms_cannot_run_are_refused_before_anything_starts(
    args: list[str], message: str, tmp_path: Path
) -> None:
    # Execute
    result = _invoke(tmp_path, tmp_path / "out", *args)
    # Assert
    assert result.exit_code != 0
    assert message in " ".join(result.output.split()), result.output[-2000:]
    assert not (tmp_path / "out" / "report.json").exists()


def test_a_resumed_run_of_these_paradigms_is_refused() -> None:
    from common.config import RunConfig, TrainPlan
    from common.errors import ConfigError
    from server.paradigms.self_supervised import with_run_id

    with pytest.raises(ConfigError, match="cannot be resumed yet"):
        with_run_id(RunConfig(plan=TrainPlan(paradigm="transfer"), resume_from="old-run"))
