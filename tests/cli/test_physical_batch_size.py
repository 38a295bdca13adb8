"""`--physical-batch-size`: a simulated federation whose hospitals run each DP step's Poisson
batch in parts (`vesalius federation run`), and the option a real node is started with
(`vesalius node start`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from client.training import trainer

pytestmark = pytest.mark.slow


def test_a_federation_whose_hospitals_train_in_parts_completes_with_the_same_budget(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.dicom.synth import synthesize_federation

    root = tmp_path / "data"
    synthesize_federation(root, n_sites=3, patients_per_site=40, images_per_patient=(1, 1),
                          image_size=16, seed=4)
    parts: list[int] = []
    split = trainer._Parts.split

    def counted(self: trainer._Parts, images: torch.Tensor, labels: torch.Tensor
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = split(self, images, labels)
        parts.append(len(out))
        return out

    monkeypatch.setattr(trainer._Parts, "split", counted)  # the hospitals run in this process
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(root), "--model", "cnn", "--image-size", "16",
        "--rounds", "2", "--batch-size", "8", "--min-nodes", "3", "--min-release-count", "1",
        "--secure-aggregation", "off", "--ledger-dir", str(tmp_path / "ledgers"),
        "--out", str(out), "--physical-batch-size", "3",
    ], terminal_width=200)
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    assert parts and max(parts) >= 2  # Poisson batches of ~8 ran as parts of at most 3
    assert all(0 < s["epsilon"] <= 8.0 + 1e-6 for s in doc["sites"])
    assert "Traceback" not in result.output


def test_node_start_hands_the_physical_batch_size_to_the_supernode(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from client.dicom.synth import synthesize_federation
    from cli import node_start

    root = tmp_path / "data"
    synthesize_federation(root, n_sites=1, patients_per_site=12, images_per_patient=(1, 1),
                          image_size=16, seed=5)
    site = next(root.glob("site-*"))
    started: list[list[str]] = []
    monkeypatch.setattr(node_start, "wait_for_coordinator", lambda *a, **k: 1)
    monkeypatch.setattr(node_start, "supervise",
                        lambda command, env, **kw: started.append(list(command)) or 0)
    result = CliRunner().invoke(app, [
        "node", "start", "--data", str(site), "--superlink", "127.0.0.1:9092", "--insecure",
        "--worker", "per-message", "--ledger-dir", str(tmp_path / "ledger"),
        "--physical-batch-size", "16",
    ], terminal_width=200)
    assert started, result.output[-2000:]
    config = started[0][started[0].index("--node-config") + 1]
    assert "physical-batch-size=16" in config.split()
    bad = CliRunner().invoke(app, ["node", "start", "--data", str(site), "--insecure",
                                   "--physical-batch-size", "-1"])
    assert bad.exit_code == 2 and "physical-batch-size" in bad.output
