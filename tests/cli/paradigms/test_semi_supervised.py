"""`federation run --paradigm semi-supervised` and `--augment` through the CLI on tiny
synthetic hospitals (2 sites, 1 round, 16 px): the paradigm section, every training patient
(labelled, hidden-label and unlabelled) on every node's ledger, the augment setting in the
report's configuration, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from common import messages as k
from common.ledger import Ledger
from tests.cli.paradigms import partly_labelled_federation

SITES, PATIENTS, SIZE = 2, 16, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two hospitals; site-2's labels.csv lacks a quarter of its patients (unlabelled)."""
    return partly_labelled_federation(tmp_path_factory.mktemp("semi"), sites=SITES,
                                      patients=PATIENTS, size=SIZE)


def _invoke(command: str, data: Path, out: Path, *args: str) -> Any:
    return CliRunner().invoke(app, [
        "federation", command, "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--batch-size", "8", "--epsilon", "4",
        "--ledger-dir", str(out / "ledgers"), "--out", str(out), *args],
        terminal_width=300, env={"COLUMNS": "300"})


def _run(data: Path, out: Path, *args: str) -> tuple[dict[str, Any], str]:
    result = _invoke("run", data, out, *args)
    assert result.exit_code == 0, result.output[-3000:]
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    return doc, " ".join(result.output.split())


def _training_patients(site: Path) -> int:
    from client.data.task_data import load_task_data, load_unlabelled

    return (load_task_data(site, image_size=SIZE).train.num_patients
            + load_unlabelled(site, image_size=SIZE).num_patients)


@pytest.mark.slow
def test_semi_supervised_counts_every_training_patient(demo: Path, tmp_path: Path) -> None:
    # Execute
    out = tmp_path / "semi"
    doc, screen = _run(demo, out, "--paradigm", "semi-supervised",
                       "-P", "labelled-fraction=0.3")
    # Assert: the run's own configuration and the paradigm section (no per-site split of
    # labelled and unlabelled patients), on the screen too
    assert doc["config"][k.PARADIGM] == "semi-supervised"
    section = doc["paradigm"]
    assert section["name"] == "semi-supervised"
    assert section["options"]["labelled-fraction"] == 0.3
    assert any("not released" in note for note in section["notes"])
    assert "paradigm: semi-supervised" in screen
    assert all(0 < s["epsilon"] <= 4.0 for s in doc["sites"])
    assert doc["final"]["auc_pooled"] is not None
    # every hospital's ledger charged each round for all its training patients, labelled
    # (hidden or not) and unlabelled
    expected = {f"site-{i}": _training_patients(demo / f"site-{i}") for i in (1, 2)}
    for site, patients in expected.items():
        records = Ledger(out / "ledgers" / site / "ledger.jsonl").read().records
        trains = [r.entry for r in records if r.entry.release == "train"]
        assert trains and all(e.dataset_size == patients for e in trains), (site, patients)
        assert all(e.run_id == doc["run_id"] for e in trains)
    assert {s["site"]: s["num_examples"] for s in doc["sites"]} == expected
    table = section["tables"][0]
    assert table["rows"] == [[SITES, sum(expected.values())]]


@pytest.mark.slow
def test_augment_light_reaches_the_nodes_and_the_report(demo: Path, tmp_path: Path) -> None:
    doc, _ = _run(demo, tmp_path / "aug", "--augment", "light")
    assert doc["config"][k.AUGMENT] == "light"
    assert doc["final"]["auc_pooled"] is not None


def test_refusals(demo: Path, tmp_path: Path) -> None:
    result = _invoke("run", demo, tmp_path / "a", "--paradigm", "semi-supervised",
                     "--task", "regression")
    assert result.exit_code != 0 and "semi-supervised" in result.output
    result = _invoke("run", demo, tmp_path / "b", "--paradigm", "semi-supervised",
                     "-P", "labelled-fraction=1.5")
    assert result.exit_code != 0 and "labelled-fraction must be <= 1" in result.output
    result = _invoke("run", demo, tmp_path / "c", "--augment", "heavy")
    assert result.exit_code != 0 and "heavy" in result.output
