"""Synthetic demo hospitals for every task (:mod:`client.dicom.synth_tasks`).

Each task's output must pass the de-identification gate file by file, be accepted in full by
``node check --task TASK`` (the same rules training uses) and carry the signal its labels
describe.
"""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from cli.node_check import inspect_data
from client.data.labels import TARGET_COLUMNS, parse_targets
from client.dicom.phi import check_deidentified
from client.dicom.synth_phantom import draw_anatomy, render_slice
from client.dicom.synth_tasks import (
    DEFAULT_CLASSES,
    MAX_RADIUS_MM,
    SYNTH_TASKS,
    Focus,
    add_foci,
    synthesize_task_federation,
)
from common.errors import ConfigError

PATIENTS = 12


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every task, two small sites each (seed 5, 32x32 images)."""
    root = tmp_path_factory.mktemp("tasks")
    for task in SYNTH_TASKS:
        synthesize_task_federation(root / task, task=task, n_sites=2,
                                   patients_per_site=PATIENTS, image_size=32, seed=5)
    return {task: root / task for task in SYNTH_TASKS}


def _rows(site: Path) -> list[dict[str, str]]:
    with (site / "labels.csv").open(newline="", encoding="ascii") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize("task", SYNTH_TASKS)
def test_every_file_passes_the_deidentification_gate(written: dict[str, Path], task: str) -> None:
    # Prepare
    files = sorted(written[task].rglob("*.dcm"))
    # Execute
    verdicts = [check_deidentified(pydicom.dcmread(f, stop_before_pixels=True)) for f in files]
    # Assert
    assert len(files) >= 2 * PATIENTS * 2
    assert all(v.deidentified for v in verdicts), [v.reason for v in verdicts][:3]


@pytest.mark.parametrize("task", SYNTH_TASKS)
def test_node_check_accepts_every_site_in_full(written: dict[str, Path], task: str) -> None:
    # Prepare
    sites = sorted(written[task].glob("site-*"))
    # Execute
    found = [inspect_data(site, task=task, num_classes=DEFAULT_CLASSES.get(task))
             for site in sites]
    # Assert: usable, nothing skipped, no label problem, every image trainable
    assert [site.name for site in sites] == ["site-1", "site-2"]
    for inspection in found:
        assert inspection.usable, inspection.blocking
        assert inspection.report.skipped == () and inspection.label_problems == ()
        images = inspection.report.files_used - (inspection.masks or 0)
        assert inspection.trainable_images == images > 0


@pytest.mark.parametrize("task", ["multiclass", "ordinal", "multilabel", "regression"])
def test_labels_hold_the_task_column_one_row_per_patient(written: dict[str, Path],
                                                         task: str) -> None:
    # Prepare
    site = written[task] / "site-1"
    # Execute
    rows = _rows(site)
    table = parse_targets(site / "labels.csv", task, DEFAULT_CLASSES.get(task))
    # Assert
    assert list(rows[0]) == ["patient_id", "study_uid", TARGET_COLUMNS[task]]
    assert len(rows) == len(table.targets) == PATIENTS
    assert len({row["patient_id"] for row in rows}) == PATIENTS
    assert table.problems == ()


@pytest.mark.parametrize("task", ["segmentation", "reconstruction"])
def test_tasks_without_a_column_write_no_labels(written: dict[str, Path], task: str) -> None:
    # Execute
    present = [site / "labels.csv" for site in written[task].glob("site-*")
               if (site / "labels.csv").exists()]
    # Assert
    assert present == []


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float64)


def _bright_pixels(study: Path) -> int:
    """Most pixels above 350 HU on one slice (lesions; some bone and calcification too)."""
    return max(int((_hu(f) > 350).sum()) for f in study.rglob("IM*.dcm"))


def test_ordinal_grade_and_regression_value_follow_the_lesion_size(tmp_path: Path) -> None:
    # Prepare: one site of 40 patients per task at the demo's 64x64
    for task in ("ordinal", "regression"):
        synthesize_task_federation(tmp_path / task, task=task, n_sites=1, patients_per_site=40,
                                   seed=2)
    # Execute
    measured = {}
    for task, column in (("ordinal", "label"), ("regression", "value")):
        site = tmp_path / task / "site-1"
        measured[task] = [(float(row[column]), _bright_pixels(site / "dicom" / row["patient_id"]))
                          for row in _rows(site)]
    # Assert: mean bright area grows with the grade; the value correlates with it
    grades = np.array(measured["ordinal"])
    means = [grades[grades[:, 0] == g, 1].mean() for g in range(DEFAULT_CLASSES["ordinal"])]
    assert all(a < b for a, b in zip(means, means[1:])), means
    values = np.array(measured["regression"])
    assert np.corrcoef(values[:, 0], values[:, 1])[0, 1] > 0.8
    assert values[:, 0].min() == 0.0 and values[:, 0].max() <= np.pi * MAX_RADIUS_MM**2 / 100


@pytest.mark.parametrize(
    ("focus", "sign_inside", "sign_rim"),
    [
        (Focus(-45, -5, 0, 20, 20, 20, 0.0, 700.0), 1, 1),      # hyperdense
        (Focus(-45, -5, 0, 20, 20, 20, 0.0, -400.0), -1, -1),   # hypodense
        (Focus(-45, -5, 0, 20, 20, 20, 0.0, 700.0, ring=True), -1, 1),  # ring: dark centre
    ],
)
def test_lesion_types_differ_in_appearance(focus: Focus, sign_inside: int, sign_rim: int) -> None:
    # Prepare: a liver centred where the focus is
    rng = np.random.default_rng(0)
    anatomy = draw_anatomy(rng)
    focus = Focus(anatomy.liver.cx, anatomy.liver.cy, 0.0, focus.ax, focus.ay, focus.az,
                  focus.angle, focus.contrast_hu, focus.ring)
    base = render_slice(anatomy, None, z_mm=0.0, slice_index=0, size=128, spacing_mm=1.5)
    # Execute
    diff = add_foci(base, (focus,), anatomy, z_mm=0.0, spacing_mm=1.5) - base
    # Assert: sign of the added contrast at the centre and on the rim (17 mm out)
    coords = (np.arange(128) - 63.5) * 1.5
    col = int(np.argmin(np.abs(coords - focus.cx)))
    row = int(np.argmin(np.abs(coords - focus.cy)))
    rim = int(np.argmin(np.abs(coords - (focus.cx + 17.0))))
    assert np.sign(diff[row, col]) == sign_inside
    assert np.sign(diff[row, rim]) == sign_rim


def test_slices_give_every_study_one_contiguous_series(tmp_path: Path) -> None:
    # Execute
    synthesize_task_federation(tmp_path, task="multiclass", n_sites=1, patients_per_site=4,
                               images_per_patient=(8, 8), image_size=16, seed=1)
    # Assert
    for study in sorted((tmp_path / "site-1" / "dicom").glob("*/ST1")):
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in study.rglob("*.dcm")]
        assert len(headers) == 8
        assert len({h.SeriesInstanceUID for h in headers}) == 1
        z = sorted(float(h.ImagePositionPatient[2]) for h in headers)
        assert np.allclose(np.diff(z), 6.0)


def test_output_is_deterministic_and_tasks_never_share_uids(tmp_path: Path) -> None:
    # Prepare
    def digest(folder: Path) -> str:
        return hashlib.sha256(b"".join(f.read_bytes() for f in sorted(folder.rglob("*")) if
                                       f.is_file())).hexdigest()

    # Execute
    for name, task in (("a", "multilabel"), ("b", "multilabel"), ("c", "ordinal")):
        synthesize_task_federation(tmp_path / name, task=task, n_sites=1, patients_per_site=4,
                                   image_size=16, seed=9)
    # Assert
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    uids = {task: {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID
                   for f in (tmp_path / task).rglob("*.dcm")} for task in ("a", "c")}
    assert uids["a"] and not uids["a"] & uids["c"]


@pytest.mark.parametrize(("task", "k"), [("multiclass", 7), ("multilabel", 4), ("ordinal", 1),
                                         ("binary", None), ("detection", None)])
def test_unsupported_task_or_k_is_refused_before_writing(tmp_path: Path, task: str,
                                                         k: int | None) -> None:
    # Execute
    with pytest.raises(ConfigError):
        synthesize_task_federation(tmp_path / "out", task=task, num_classes=k, n_sites=1,
                                   patients_per_site=4)
    # Assert
    assert not (tmp_path / "out").exists()
