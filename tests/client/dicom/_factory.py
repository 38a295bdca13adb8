"""Small valid DICOM files for tests (MONOCHROME2, 16-bit, Explicit VR Little Endian)."""

from __future__ import annotations

import csv
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom.data
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ROWS = 16
COLUMNS = 16


def make_dataset(
    *,
    patient_id: str = "PSEUDO-001",
    study_uid: str | None = None,
    series_uid: str | None = None,
    sop_uid: str | None = None,
    instance_number: int = 1,
    pixels: npt.NDArray[np.uint16] | None = None,
    slope: float = 1.0,
    intercept: float = 0.0,
    deidentified: bool = True,
) -> Dataset:
    """Return a de-identified 16-bit MONOCHROME2 CT image dataset with file meta."""
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientID = patient_id
    ds.PatientName = patient_id
    ds.Modality = "CT"
    ds.InstanceNumber = instance_number
    if deidentified:
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "test factory"
    else:
        ds.PatientBirthDate = "19700101"
        ds.InstitutionName = "General Hospital"
    if pixels is None:
        rng = np.random.default_rng(instance_number)
        pixels = rng.integers(0, 1000, size=(ROWS, COLUMNS), dtype=np.uint16)
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def write_dataset(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM Part 10 file (with preamble) and return ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_image(path: Path, **kwargs: object) -> Dataset:
    """Build with :func:`make_dataset` (``kwargs``), write to ``path`` and return it."""
    ds = make_dataset(**kwargs)  # type: ignore[arg-type]
    write_dataset(ds, path)
    return ds


def write_labels(data_dir: Path, rows: Iterable[tuple[str, str, object]]) -> Path:
    """Write ``labels.csv`` with header ``patient_id,study_uid,label``."""
    path = data_dir / "labels.csv"
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["patient_id", "study_uid", "label"])
        writer.writerows(rows)
    return path


def make_node_folder(
    data_dir: Path, *, patients: int = 12, images_per_patient: int = 2, labelled: int | None = None
) -> dict[str, int]:
    """Write ``patients`` x ``images_per_patient`` images (one study each) and labels.

    The first ``labelled`` patients (all by default) get label ``i % 2``. Returns the map
    patient_id -> label of the labelled patients.
    """
    labelled = patients if labelled is None else labelled
    rows: list[tuple[str, str, object]] = []
    out: dict[str, int] = {}
    for p in range(patients):
        pid = f"PSEUDO-{p:03d}"
        study = generate_uid()
        series = generate_uid()
        for i in range(images_per_patient):
            write_image(
                data_dir / pid / f"img{i}.dcm",
                patient_id=pid,
                study_uid=study,
                series_uid=series,
                instance_number=i + 1,
            )
        if p < labelled:
            rows.append((pid, study, p % 2))
            out[pid] = p % 2
    write_labels(data_dir, rows)
    return out


#: pydicom's bundled, PHI-free example files (inside the installed wheel; never downloaded).
PYDICOM_TEST_FILES = Path(pydicom.data.__file__).resolve().parent / "test_files"


def _corpus_dir() -> Path | None:
    """The ``pydicom-data`` corpus (a dev dependency: installed files, never downloaded)."""
    try:
        import data_store
    except ImportError:
        return None
    return Path(data_store.__file__).resolve().parent / "data"


def testdata_path(name: str) -> Path:
    """Path of a pydicom example: bundled with pydicom, or in the ``pydicom-data`` corpus.

    Skips when neither has it; fails in CI (``CI=true``), where the dev dependencies are
    always installed.
    """
    import os

    import pytest

    corpus = _corpus_dir()
    for folder in (PYDICOM_TEST_FILES, corpus):
        if folder is not None and (folder / name).is_file():
            return folder / name
    why = f"pydicom example {name} is neither bundled with pydicom nor in pydicom-data"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(why + " (CI installs the dev dependencies: `pip install -e .[dev]`)")
    pytest.skip(why)


def copy_testdata(name: str, dest: Path) -> Path:
    """Copy one of pydicom's bundled example files to ``dest``."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(testdata_path(name), dest)
    return dest
