"""`vesalius federation cv`: option checks, and a real simulated 2-fold cross-validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

VESALIUS = str(Path(sys.executable).parent / "vesalius")


@pytest.mark.parametrize("choice", [[], ["--folds", "3", "--leave-one-site-out"], ["--folds", "1"]])
def test_exactly_one_kind_of_cross_validation_is_required(tmp_path: Path, choice: list[str]) -> None:
    result = CliRunner().invoke(app, ["federation", "cv", "--data-root", str(tmp_path),
                                      "--out", str(tmp_path / "o"), *choice])
    assert result.exit_code == 2 and "--leave-one-site-out" in result.output
    assert not (tmp_path / "o").exists()


def test_simulation_needs_a_data_root(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["federation", "cv", "--folds", "2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "--data-root" in result.output


@pytest.mark.slow
def test_two_fold_cross_validation_on_a_synthetic_federation(tmp_path: Path) -> None:
    # Prepare: two tiny hospitals; node ledgers in a fresh home (budgets are per dataset).
    env = {**os.environ, "VESALIUS_HOME": str(tmp_path / "home"),
           "FLWR_HOME": str(tmp_path / "flwr"), "COLUMNS": "200"}
    synth = subprocess.run([VESALIUS, "synth", "--out", str(tmp_path / "data"), "--sites", "2",
                            "--patients", "24", "--seed", "3"],
                           capture_output=True, text=True, timeout=300, env=env)
    assert synth.returncode == 0, synth.stdout[-2000:] + synth.stderr[-2000:]
    out = tmp_path / "cv"
    # Execute
    run = subprocess.run(
        [VESALIUS, "federation", "cv", "--data-root", str(tmp_path / "data"), "--folds", "2",
         "--rounds", "1", "--batch-size", "8", "--image-size", "16", "--epsilon", "8",
         "--epsilon-cap", "8", "--min-release-count", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    # Assert
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    assert "Pooled over 2 folds" in run.stdout and "report.html" in run.stdout
    doc = json.loads((out / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert doc["status"] == "completed" and cv["mode"] == "kfold" and cv["num_folds"] == 2
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    for row in [*cv["folds"], cv["pooled"]]:
        auc = row["auc"]
        assert 0 <= auc["lower"] <= auc["value"] <= auc["upper"] <= 1 and auc["method"] == "delong"
        acc = row["accuracy"]
        assert 0 <= acc["lower"] <= acc["value"] <= acc["upper"] <= 1
    # Every labelled patient of both sites is held out exactly once.
    assert cv["pooled"]["n"] == sum(f["n"] for f in cv["folds"]) == 48
    for row in cv["folds"]:
        assert set(row["epsilon_by_site"]) == {"site-1", "site-2"}
        assert all(0 < eps <= 8.0 for eps in row["epsilon_by_site"].values())
    fold_eps = []
    for fold in (0, 1):
        fold_doc = json.loads((out / f"fold-{fold}" / "report.json").read_text())
        assert fold_doc["config"]["fold"] == fold and fold_doc["config"]["cv-mode"] == "kfold"
        assert (out / f"fold-{fold}" / "checkpoints" / "final.pt").exists()
        fold_eps.append({r["site"]: r["epsilon"] for r in fold_doc["sites"]})
    # ε is the cross-validation's so far (a patient trains in both folds), not the fold's own:
    # after fold 0 they agree; after fold 1 it exceeds fold 1's own, and the whole
    # cross-validation's is what each node's fresh ledger holds for the dataset
    first, second = (f["epsilon_by_site"] for f in cv["folds"])
    for site in ("site-1", "site-2"):
        assert first[site] == pytest.approx(fold_eps[0][site])
        assert second[site] > max(first[site], fold_eps[1][site])
    for row in doc["sites"]:
        assert row["epsilon"] == pytest.approx(second[row["site"]])
        assert row["epsilon"] == pytest.approx(row["epsilon_dataset"], rel=1e-9)
    assert "ε for the whole cross-validation" in run.stdout
    html = (out / "report.html").read_text()
    assert "Cross-validation" in html and "<table" in html
