"""`vesalius federation cv --task ordinal`: a real simulated 2-fold cross-validation.

Skipped, with the reason, while ``cli/federation.py`` still refuses non-binary tasks
("cross-validation pools binary results only so far"); it runs once that refusal is gone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app

VESALIUS = str(Path(sys.executable).parent / "vesalius")
REFUSAL = "binary results only"


def _skip_while_the_cli_refuses_tasks(tmp_path: Path) -> None:
    probe = CliRunner().invoke(app, ["federation", "cv", "--task", "ordinal", "--num-classes",
                                     "3", "--folds", "2", "--data-root", str(tmp_path),
                                     "--out", str(tmp_path / "probe")])
    if REFUSAL in re.sub(r"[\s│]+", " ", probe.output):
        pytest.skip("the CLI still refuses non-binary cross-validation ('cross-validation "
                    "pools binary results only so far' in cli/federation.py); server.cv "
                    "supports every task (tests/server/test_cv_tasks.py)")


@pytest.mark.slow
def test_two_fold_ordinal_cross_validation_on_a_synthetic_federation(tmp_path: Path) -> None:
    _skip_while_the_cli_refuses_tasks(tmp_path)
    # Prepare: two tiny ordinal hospitals (3 grades); node ledgers in a fresh home.
    from client.dicom.synth_tasks import synthesize_task_federation

    synthesize_task_federation(tmp_path / "data", task="ordinal", num_classes=3, n_sites=2,
                               patients_per_site=60, images_per_patient=(1, 2), image_size=16,
                               seed=3)
    env = {**os.environ, "VESALIUS_HOME": str(tmp_path / "home"),
           "FLWR_HOME": str(tmp_path / "flwr"), "COLUMNS": "200"}
    out = tmp_path / "cv"
    # Execute
    run = subprocess.run(
        [VESALIUS, "federation", "cv", "--task", "ordinal", "--num-classes", "3",
         "--data-root", str(tmp_path / "data"), "--folds", "2", "--rounds", "1",
         "--batch-size", "8", "--image-size", "16", "--epsilon", "8", "--epsilon-cap", "8",
         "--min-release-count", "1", "--out", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    # Assert
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    doc = json.loads((out / "report.json").read_text())
    cv = doc["inference"]["cv"]
    assert doc["status"] == "completed" and cv["task"] == "ordinal"
    assert cv["mode"] == "kfold" and cv["num_folds"] == 2 and cv["metric"] == "kappa_quadratic"
    assert [f["fold"] for f in cv["folds"]] == [0, 1]
    for row, detail in zip(cv["folds"], cv["fold_details"], strict=True):
        assert row["kappa_quadratic"] is not None and row["n"] > 0
        assert detail["heldout_inference"]["split"] == "heldout"
        assert set(row["epsilon_by_site"]) == {"site-1", "site-2"}
        assert all(0 < eps <= 8.0 for eps in row["epsilon_by_site"].values())
    # Every patient of both sites is held out exactly once.
    assert cv["pooled"]["n"] == sum(f["n"] for f in cv["folds"]) == 120
    assert cv["pooled"]["kappa_quadratic"]["method"] == "mean over folds"
    assert (out / "fold-1" / "checkpoints" / "final.pt").exists()
    html = (out / "report.html").read_text()
    assert "Cross-validation" in html and "<table" in html
