"""Every task trains through `vesalius federation run` on demo data, and its report says so.

One short DP simulation per task on tiny synthetic hospitals (2 sites, 1 round, 16 px):
ordinal, multi-label, regression and segmentation with their pooled test inference; a 3D
model on volumes and a recurrent one over series; self-supervised reconstruction and then
fine-tuning from its checkpoint (``--init-from``). Numbers are not judged here (one round
learns little); the tests check that each run completes, spends within the cap, reports the
task's own section and shows it on the screen.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli.app import app
from common import messages as k

pytestmark = pytest.mark.slow

SITES, PATIENTS, SIZE = 2, 40, 16


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``demo(task, **kw)``: a synthetic federation of ``task`` (made once per module)."""
    made: dict[tuple[str, int], Path] = {}

    def make(task: str, slices: int = 0) -> Path:
        key = (task, slices)
        if key not in made:
            root = tmp_path_factory.mktemp(f"{task}{slices}")
            if task == "segmentation":
                from client.dicom.synth_seg import synthesize_segmentation_federation

                synthesize_segmentation_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                                                   images_per_patient=(1, 2), image_size=SIZE,
                                                   seed=1)
            elif task == "binary":
                from client.dicom.synth import synthesize_federation

                synthesize_federation(root, n_sites=SITES, patients_per_site=PATIENTS,
                                      images_per_patient=(1, 2), image_size=SIZE, seed=1)
            else:
                from client.dicom.synth_tasks import synthesize_task_federation

                images = (slices, slices) if slices else (1, 2)
                synthesize_task_federation(root, task=task, num_classes=3, n_sites=SITES,
                                           patients_per_site=PATIENTS, images_per_patient=images,
                                           image_size=SIZE, seed=1)
            made[key] = root
        return made[key]

    return make


def _run(data: Path, out: Path, *args: str) -> tuple[dict[str, Any], str]:
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "1", "--image-size",
        str(SIZE), "--min-release-count", "1", "--ledger-dir", str(out / "ledgers"),
        "--out", str(out), *args], terminal_width=200)
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["status"] == "completed", doc.get("reason")
    assert all(0 < s["epsilon"] <= 8.0 for s in doc["sites"]), doc["sites"]
    return doc, " ".join(result.output.split())


@pytest.mark.parametrize(("task", "model", "screen_text"), [
    ("ordinal", "cnn", "quadratic-weighted kappa"),
    ("multilabel", "cnn", "macro AUC"),
    ("regression", "cnn", "Bland-Altman bias"),
    ("segmentation", "unet", "mean Dice"),
])
def test_a_task_trains_and_reports_its_pooled_inference(
    task: str, model: str, screen_text: str, demo: Any, tmp_path: Path
) -> None:
    # Prepare
    data = demo(task)
    extra = [] if task in ("regression", "segmentation") else ["--num-classes", "3"]
    # Execute
    doc, screen = _run(data, tmp_path / "out", "--task", task, "--model", model, *extra)
    # Assert: the task's own inference section, on the screen, in summary.txt and report.html
    inf = doc["inference"]
    assert doc["config"][k.TASK] == task and inf["task"] == task
    assert inf["status"] == "completed" and isinstance(inf.get(task), dict), inf
    assert screen_text in screen
    summary = (tmp_path / "out" / "summary.txt").read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    assert summary.strip() and page.count("<img") >= 1
    if task == "segmentation":
        assert "Synthetic phantom slices, not patients" in page


@pytest.mark.parametrize(("model", "samples"), [("cnn3d", "volume-3d"), ("lstm", "series")])
def test_volumes_and_series_train_a_multiclass_task(
    model: str, samples: str, demo: Any, tmp_path: Path
) -> None:
    # Prepare: 4-slice studies, one volume per study
    data = demo("multiclass", slices=4)
    # Execute
    doc, screen = _run(data, tmp_path / "out", "--task", "multiclass", "--num-classes", "3",
                       "--model", model, "--samples", samples)
    # Assert: one sample per study (patients, not slices, are the records), pooled inference
    assert doc["config"][k.SAMPLES] == samples
    assert doc["inference"]["status"] == "completed"
    assert all(s["num_examples"] <= PATIENTS for s in doc["sites"])
    assert "macro AUC" in screen


def test_reconstruction_pretraining_then_fine_tuning_from_its_checkpoint(
    demo: Any, tmp_path: Path
) -> None:
    # Prepare
    data = demo("binary")
    # Execute: self-supervised pretraining, then a binary run initialised from it
    pre, _ = _run(data, tmp_path / "pre", "--task", "reconstruction", "--model", "autoencoder")
    checkpoint = tmp_path / "pre" / "checkpoints" / "final.pt"
    fine, screen = _run(data, tmp_path / "fine", "--task", "binary", "--model", "autoencoder",
                        "--init-from", str(checkpoint))
    # Assert: pretraining reports a loss and no pooled inference; the fine-tuning run records
    # which checkpoint (by hash) initialised which tensors
    assert pre["inference"]["status"] == "not applicable"
    assert all(r["metrics"][k.LOSS] > 0 for r in pre["rounds"])
    init = fine["init_from"]
    assert init["checkpoint"] == "final.pt" and len(init["sha256"]) == 64
    assert init["tensors_loaded"] >= 4 and init["tensors_skipped"] == 0
    assert "Final test AUC" in screen


@pytest.mark.parametrize("model", ["dbn", "dbm"])
def test_boltzmann_machines_pretrain_with_the_reconstruction_task(
    model: str, demo: Any, tmp_path: Path
) -> None:
    doc, _ = _run(demo("binary"), tmp_path / "out", "--task", "reconstruction", "--model", model)
    assert doc["rounds"][0]["train"] and (tmp_path / "out" / "checkpoints" / "final.pt").is_file()
