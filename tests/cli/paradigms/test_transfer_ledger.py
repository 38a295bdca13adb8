"""The SHA-256 of a transfer run's local checkpoint (``-P pretrained=FILE``) on every node's
ledger: each fine-tuning round's entry records it (entry parameter ``paradigm_options``), the
report says the same hash, and ``vesalius audit export`` carries it (2 sites, 1 round, 16 px)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger

SITES, PATIENTS, SIZE = 2, 16, 16


@pytest.mark.slow
def test_a_local_checkpoints_hash_is_on_every_nodes_ledger(tmp_path: Path) -> None:
    from client.dicom.synth import synthesize_federation
    from common.models import build_model

    # Prepare: two hospitals and a local checkpoint of the plan's model
    data = tmp_path / "data"
    synthesize_federation(data, n_sites=SITES, patients_per_site=PATIENTS,
                          images_per_patient=(1, 2), image_size=SIZE, seed=1)
    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(0)
    torch.save(build_model("cnn", in_channels=1, num_classes=2, image_size=SIZE).state_dict(),
               checkpoint)
    sha = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    out = tmp_path / "out"
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--batch-size", "8", "--epsilon", "2",
        "--ledger-dir", str(out / "ledgers"), "--out", str(out), "--paradigm", "transfer",
        "-P", f"pretrained={checkpoint}", "-P", "compare-scratch=false"],
        terminal_width=300, env={"COLUMNS": "300"})
    # Assert: the report and every node's fine-tuning entries name the same hash
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["paradigm"]["pretrained"]["sha256"] == sha
    ledgers = sorted(p for p in (out / "ledgers").iterdir() if (p / "ledger.jsonl").is_file())
    assert len(ledgers) == SITES
    for folder in ledgers:
        trains = [r.entry for r in Ledger(folder / "ledger.jsonl").read().records
                  if r.entry.release == "train"]
        assert trains and all(e.params["paradigm"] == "fine-tune-rounds" for e in trains)
        assert all(json.loads(e.params["paradigm_options"])["init-sha256"] == sha
                   for e in trains)
        # Execute + Assert: the auditor's signed export shows it
        export = tmp_path / f"{folder.name}.json"
        audit = CliRunner().invoke(app, ["audit", "export", "--ledger",
                                         str(folder / "ledger.jsonl"), "--out", str(export)])
        assert audit.exit_code == 0, audit.output
        assert sha in export.read_text()
