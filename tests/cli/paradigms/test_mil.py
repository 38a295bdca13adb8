"""``vesalius federation run --paradigm mil``: a study's volume as a bag of its slices.

A plan that is not an MIL model on bags of slices is refused before anything runs. One short
DP simulation on tiny synthetic hospitals (2 sites, 4-slice studies, 16 px): the
run completes under the ε cap, its report carries the MIL paradigm section (what the bags
were, bags per hospital, the pooled test AUC, attention only at the nodes), every node's
ledger holds the run's releases; ``federation cv --paradigm mil`` holds every patient out
once; then ``vesalius node attention`` draws a hospital's slice
attention from the final checkpoint into a local folder, with nothing identifying in it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from common import messages as k

SITES, PATIENTS, SLICES, SIZE = 2, 30, 4, 16


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic binary federation of 4-slice studies (one series each)."""
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("mil")
    synthesize_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                          images_per_patient=(SLICES, SLICES), image_size=SIZE, seed=3)
    return root


@pytest.fixture(scope="module")
def mil_run(volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The MIL run's output folder and its screen text."""
    out = tmp_path_factory.mktemp("mil-out")
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(volumes), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--ledger-dir", str(out / "ledgers"),
        "--out", str(out), "--paradigm", "mil", "--model", "mil-attention",
        "--samples", "series"], terminal_width=200)
    assert result.exit_code == 0, result.output[-3000:]
    return out, " ".join(result.output.split())


@pytest.mark.parametrize(("args", "words"), [
    (["--model", "cnn3d", "--samples", "volume-3d"], "needs a multi-instance model"),
    (["--model", "mil-attention", "--samples", "image-2d"], "serves it on: volume-3d, series"),
    (["--model", "mil-attention", "--task", "regression"], "serves the tasks binary"),
])
def test_mil_refuses_a_plan_that_is_not_bags_of_slices(args: list[str], words: str,
                                                       tmp_path: Path) -> None:
    (tmp_path / "site-1").mkdir()
    result = CliRunner().invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                      "--paradigm", "mil", "--out", str(tmp_path / "out"),
                                      *args], terminal_width=300)
    assert result.exit_code != 0
    assert words in " ".join(result.output.replace("│", " ").split())
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.slow
def test_mil_run_reports_its_bags_and_a_pooled_test_auc(mil_run: tuple[Path, str]) -> None:
    # Prepare
    out, screen = mil_run
    # Execute
    doc: dict[str, Any] = json.loads((out / "report.json").read_text())
    # Assert: completed under the cap, one bag per patient, the paradigm section
    assert doc["status"] == "completed", doc.get("reason")
    assert doc["config"][k.PARADIGM] == "mil" and doc["config"][k.SAMPLES] == "series"
    assert all(0 < s["epsilon"] <= 8.0 for s in doc["sites"]), doc["sites"]
    assert all(0 < s["num_examples"] <= PATIENTS for s in doc["sites"])
    auc = doc["inference"]["metrics"]["auc"]["value"]
    assert auc is not None and 0.0 <= auc <= 1.0
    section = doc["paradigm"]
    assert section["name"] == "mil" and section["options"]["model"] == "mil-attention"
    assert any("bags: one per study" in n for n in section["notes"])
    assert any("only at each hospital" in n for n in section["notes"])
    bags = section["tables"][0]
    assert [row[1] for row in bags["rows"]] == [s["num_examples"] for s in doc["sites"]]
    assert section["tables"][1]["rows"][0] == ["mil-attention", auc]
    assert "paradigm: mil" in screen and "attention" in screen
    assert "paradigm: mil" in (out / "summary.txt").read_text()


@pytest.mark.slow
def test_mil_run_is_on_every_nodes_ledger(mil_run: tuple[Path, str]) -> None:
    out, _ = mil_run
    run_id = json.loads((out / "report.json").read_text())["run_id"]
    ledgers = sorted(p for p in (out / "ledgers").rglob("*") if p.is_file())
    texts = [p.read_text(errors="replace") for p in ledgers]
    holding = [p for p, text in zip(ledgers, texts) if run_id in text]
    assert len({p.parent for p in holding}) >= SITES, ledgers


@pytest.mark.slow
def test_mil_cross_validates_with_federation_cv(volumes: Path, tmp_path: Path) -> None:
    # Execute: 2 folds over the same bags (fresh ledgers)
    out = tmp_path / "cv"
    result = CliRunner().invoke(app, [
        "federation", "cv", "--data-root", str(volumes), "--folds", "2", "--rounds", "1",
        "--image-size", str(SIZE), "--min-release-count", "1", "--ledger-dir",
        str(out / "ledgers"), "--out", str(out), "--paradigm", "mil", "--model",
        "mil-attention", "--samples", "series"], terminal_width=200)
    # Assert: every patient held out once, one bag each, within the cap over both folds
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert doc["status"] == "completed" and doc["config"][k.PARADIGM] == "mil"
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    assert cv["pooled"]["n"] == SITES * PATIENTS
    assert all(0 < e <= 8.0 for f in cv["folds"] for e in f["epsilon_by_site"].values())
    assert 0.0 <= cv["pooled"]["auc"]["value"] <= 1.0


@pytest.mark.slow
def test_node_attention_writes_local_plots_with_nothing_identifying(
    volumes: Path, mil_run: tuple[Path, str], tmp_path: Path
) -> None:
    # Prepare
    out, _ = mil_run
    site = sorted(volumes.glob("site-*"))[0]
    local = tmp_path / "attention"
    # Execute
    result = CliRunner().invoke(app, [
        "node", "attention", "--data-dir", str(site), "--checkpoint",
        str(out / "checkpoints" / "final.pt"), "--image-size", str(SIZE), "--out", str(local),
        "--split", "test"], terminal_width=200)
    # Assert: one row per test study, weights summing to 1, PNGs, no patient id or UID
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((local / "attention.json").read_text())
    assert doc["studies"] and all(len(s["weights"]) == SIZE for s in doc["studies"])
    assert all(abs(sum(s["weights"]) - 1.0) < 1e-4 for s in doc["studies"])
    assert list(local.glob("*.png"))
    patient_ids = {line.split(",")[0] for line in
                   (site / "labels.csv").read_text().splitlines()[1:]}
    written = result.output + (local / "attention.json").read_text()
    assert not any(pid and pid in written for pid in patient_ids)
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", written), "a UID was written"
    assert "never sent" in " ".join(result.output.split())
