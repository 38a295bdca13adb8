"""``vesalius federation run --paradigm multi-task``: a shared trunk, a mask head and a
lesion-present head.

A plan the paradigm cannot train is refused before anything runs. One short DP simulation on
tiny synthetic segmentation hospitals (2 sites, 16 px, 1 round): the run completes under the
ε cap, its report carries the per-task results (the segmentation head's pooled Dice, the
presence head's pooled AUC from the hospitals' histograms) and every node's ledger holds the
run's releases, the presence query included.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from common import messages as k

SITES, PATIENTS, SIZE = 2, 24, 16


@pytest.fixture(scope="module")
def masks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny synthetic segmentation hospitals (images with lesion masks)."""
    from client.dicom.synth_seg import synthesize_segmentation_federation

    data = tmp_path_factory.mktemp("mt-data")
    synthesize_segmentation_federation(data, n_sites=SITES, patients_per_site=PATIENTS,
                                       images_per_patient=(1, 3), image_size=SIZE, seed=1)
    return data


@pytest.fixture(scope="module")
def multi_task_run(masks: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The multi-task run's output folder and its screen text."""
    data = masks
    out = tmp_path_factory.mktemp("mt-out")
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--ledger-dir", str(out / "ledgers"),
        "--out", str(out), "--task", "segmentation", "--model", "multi-task-unet",
        "--paradigm", "multi-task", "-P", "presence-weight=0.8"], terminal_width=200)
    assert result.exit_code == 0, result.output[-3000:]
    return out, " ".join(result.output.split())


@pytest.mark.parametrize(("args", "words"), [
    (["--task", "segmentation", "--model", "unet"], "one trunk and several heads"),
    (["--task", "binary", "--model", "cnn"], "serves the tasks segmentation"),
    (["--task", "segmentation", "--model", "multi-task-unet", "-P", "presence-weight=0",
      "-P", "segmentation-weight=0"], "nothing would be learned"),
])
def test_multi_task_refuses_a_plan_it_cannot_train(args: list[str], words: str,
                                                   tmp_path: Path) -> None:
    (tmp_path / "site-1").mkdir()
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                      "--paradigm", "multi-task", "--out",
                                      str(tmp_path / "out"), *args], terminal_width=300)
    assert result.exit_code != 0
    assert words in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_multi_task_run_reports_each_task_pooled(multi_task_run: tuple[Path, str]) -> None:
    # Prepare
    out, screen = multi_task_run
    # Execute
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    # Assert: completed under the cap, with the run's own paradigm and both tasks' results
    assert doc["status"] == "completed", doc.get("reason")
    assert doc["config"][k.PARADIGM] == "multi-task"
    assert all(0 < s["epsilon"] <= 8.0 for s in doc["sites"]), doc["sites"]
    section = doc["paradigm"]
    assert section["name"] == "multi-task" and section["options"]["presence-weight"] == 0.8
    tasks = {row[0].split(" ")[0]: row for row in section["tables"][0]["rows"]}
    assert set(tasks) == {"segmentation", "presence"}
    dice = doc["inference"]["segmentation"]["dice"]
    assert tasks["segmentation"][3] == pytest.approx(dice["value"]) and 0 <= dice["value"] <= 1
    presence = section["presence"]
    assert not presence["failures"], presence["failures"]
    pooled = presence["pooled"]
    assert 0.0 <= pooled["auc"] <= 1.0 and tasks["presence"][3] == pooled["auc"]
    # each test patient weighs 1 in the pooled histograms
    assert pooled["lesion_weight"] + pooled["no_lesion_weight"] == pytest.approx(pooled["n"])
    assert len(presence["sites"]) == SITES
    # the presence figures are at the operating threshold chosen on validation patients
    assert 0.0 <= presence["threshold"] <= 1.0 and "hist" not in presence
    assert f"{presence['threshold']:.3f}" in json.dumps(section["tables"])
    assert "paradigm: multi-task" in screen
    assert "paradigm: multi-task" in (out / "summary.txt").read_text()


@pytest.mark.slow
def test_multi_task_run_is_on_every_nodes_ledger(multi_task_run: tuple[Path, str]) -> None:
    out, _ = multi_task_run
    run_id = json.loads((out / "report.json").read_text())["run_id"]
    ledgers = sorted(p for p in (out / "ledgers").rglob("*") if p.is_file())
    holding = [p for p in ledgers if run_id in p.read_text(errors="replace")]
    assert len({p.parent for p in holding}) >= SITES, ledgers
    presence_query = [p for p in holding if "multi-task-presence" in p.read_text(errors="replace")]
    assert len({p.parent for p in presence_query}) >= SITES
    for ledger in {p.parent for p in presence_query}:  # asked on validation, then test
        text = "\n".join(q.read_text(errors="replace") for q in ledger.iterdir() if q.is_file())
        assert text.count("query:multi-task-presence") >= 2, ledger


@pytest.mark.slow
def test_multi_task_cross_validates_with_federation_cv(masks: Path, tmp_path: Path) -> None:
    # Execute: 2 folds, both heads trained at every node (fresh ledgers)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, [
        "federation", "cv", "--data-root", str(masks), "--folds", "2", "--rounds", "1",
        "--image-size", str(SIZE), "--min-release-count", "1", "--ledger-dir",
        str(out / "ledgers"), "--out", str(out), "--task", "segmentation", "--model",
        "multi-task-unet", "--paradigm", "multi-task"], terminal_width=200)
    # Assert: every fold scored on the segmentation head's pooled Dice, within the cap
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert doc["status"] == "completed" and doc["config"][k.PARADIGM] == "multi-task"
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    assert cv["task"] == "segmentation" and cv["pooled"]["n"] == SITES * PATIENTS
    assert 0.0 <= cv["pooled"]["dice"]["value"] <= 1.0
    assert all(0 < e <= 8.0 for f in cv["folds"] for e in f["epsilon_by_site"].values())
    ledgers = [p.read_text(errors="replace") for p in (out / "ledgers").rglob("*") if p.is_file()]
    assert any("multi-task" in text for text in ledgers)
