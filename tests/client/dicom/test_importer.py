"""Tests for ``vesalius import``'s library (:mod:`client.dicom.importer` and its readers).

Every import is checked the way a node sees it: :func:`client.dicom.scan_data_dir` with one
pixel decode per file must use every file and match every label, the headers must pass
:func:`client.dicom.phi.check_deidentified`, and the pixels and labels must be the source's.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from client.dicom import scan_data_dir
from client.dicom.import_dicom import IMPORT_METHOD, pseudonym
from client.dicom.import_npz import read_npz
from client.dicom.import_source import to_greyscale
from client.dicom.importer import MARKER, ImportOptions, import_dataset
from client.dicom.phi import check_deidentified
from common.errors import ConfigError, DataError

MEDMNIST = ("breastmnist", "pneumoniamnist", "adrenalmnist3d", "adrenalmnist3d_64")
_PSEUDONYM = re.compile(r"^IMP-\d{6}$")


def _labels_csv(folder: Path) -> dict[str, tuple[str, int]]:
    with (folder / "labels.csv").open(newline="", encoding="ascii") as handle:
        rows = list(csv.DictReader(handle))
    return {r["patient_id"]: (r["study_uid"], int(r["label"])) for r in rows}


def _headers(folder: Path) -> list[tuple[Path, pydicom.Dataset]]:
    return [(p, pydicom.dcmread(p)) for p in sorted(folder.rglob("*.dcm"))]


def _assert_node_accepts(folder: Path) -> None:
    """Every file used, every label row matched, every image labelled, every pixel decoded."""
    _, report = scan_data_dir(folder, decode_pixels=True)
    assert report.files_seen > 0
    assert report.files_used == report.files_seen and not report.skipped
    assert report.labelled_images == report.files_used
    assert report.unmatched_label_rows == 0
    assert report.label_counts.get("unlabelled", 0) == 0


def _npz_arrays(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as archive:
        images = np.concatenate([archive[f"{s}_images"] for s in ("train", "val", "test")])
        labels = np.concatenate([archive[f"{s}_labels"] for s in ("train", "val", "test")])
    return images, labels.reshape(-1)


# --- MedMNIST .npz ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", MEDMNIST)
def test_each_shared_medmnist_file_imports_to_a_folder_the_node_accepts_in_full(
    name: str, shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file(f"medmnist/{name}.npz")
    count = 24 if not name.startswith("adrenal") else 3
    images, labels = _npz_arrays(source)
    # Execute
    summary = import_dataset(source, tmp_path / "node", options=ImportOptions(max_images=count))
    # Assert: the node uses everything, and labels and pixels are the source's, in order.
    out = tmp_path / "node"
    _assert_node_accepts(out)
    rows = _labels_csv(out)
    assert sorted(rows) == [pseudonym(i) for i in range(count)]
    assert summary.patients == count
    for i in range(count):
        assert rows[pseudonym(i)][1] == labels[i]
    headers = _headers(out)
    slices = 1 if images.ndim == 3 else images.shape[1]
    assert len(headers) == summary.files == count * slices
    for _, ds in headers:
        index = int(ds.PatientID[4:]) - 1
        expected = images[index] if images.ndim == 3 else images[index][ds.InstanceNumber - 1]
        np.testing.assert_array_equal(ds.pixel_array, expected)
        assert ds.StudyInstanceUID == rows[ds.PatientID][0]
    assert summary.kind.value == ("2d" if images.ndim == 3 else "3d")


def test_written_headers_carry_no_phi_and_only_pseudonyms(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file("medmnist/breastmnist.npz")
    # Execute
    import_dataset(source, tmp_path / "node", options=ImportOptions(max_images=10))
    # Assert
    for _, ds in _headers(tmp_path / "node"):
        verdict = check_deidentified(ds)
        assert verdict.deidentified, verdict.reason
        assert _PSEUDONYM.match(ds.PatientID) and str(ds.PatientName) == ds.PatientID
        assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod == IMPORT_METHOD
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.SamplesPerPixel == 1
        assert ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert [float(v) for v in ds.PixelSpacing] == [1.0, 1.0]
        for keyword in ("PatientBirthDate", "StudyDate", "ReferringPhysicianName",
                        "InstitutionName", "OtherPatientIDs"):
            assert not str(ds.get(keyword, "") or "")
        text = str(ds)
        assert "breastmnist" not in text.lower() and "npz" not in text.lower()


def test_volumes_become_one_series_of_positioned_slices_per_patient(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file("medmnist/adrenalmnist3d.npz")
    # Execute
    summary = import_dataset(source, tmp_path / "node", options=ImportOptions(
        max_images=2, pixel_spacing_mm=0.8, slice_thickness_mm=2.5))
    # Assert
    by_patient: dict[str, list[pydicom.Dataset]] = {}
    for _, ds in _headers(tmp_path / "node"):
        by_patient.setdefault(ds.PatientID, []).append(ds)
    assert len(by_patient) == 2
    for series in by_patient.values():
        series.sort(key=lambda d: int(d.InstanceNumber))
        assert len(series) == 28
        assert len({d.StudyInstanceUID for d in series}) == 1
        assert len({d.SeriesInstanceUID for d in series}) == 1
        assert len({d.FrameOfReferenceUID for d in series}) == 1
        z = [float(d.ImagePositionPatient[2]) for d in series]
        np.testing.assert_allclose(np.diff(z), 2.5)
        for ds in series:
            assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
            assert float(ds.SliceThickness) == 2.5 and float(ds.SliceLocation) == float(
                ds.ImagePositionPatient[2])
            assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.8]
    assert any("slice" in note and "2-D" in note for note in summary.notes)


def test_sites_split_patients_disjointly_and_each_site_is_a_node_folder(
    shared_file: Callable[[str], Path], tmp_path: Path
) -> None:
    # Prepare
    source = shared_file("medmnist/breastmnist.npz")
    options = ImportOptions(sites=3, split="dirichlet", alpha=0.5, seed=7, max_images=60)
    # Execute
    summary = import_dataset(source, tmp_path / "a", options=options)
    again = import_dataset(source, tmp_path / "b", options=options)
    # Assert
    assert [s.site for s in summary.sites] == ["site-1", "site-2", "site-3"]
    members = [set(_labels_csv(tmp_path / "a" / s)) for s in ("site-1", "site-2", "site-3")]
    assert sum(len(m) for m in members) == 60 == len(set().union(*members))
    assert all(members)
    for site in ("site-1", "site-2", "site-3"):
        _assert_node_accepts(tmp_path / "a" / site)
    # the split depends on the seed only; the UIDs on the content: a re-import is identical
    assert [s.label_counts for s in summary.sites] == [s.label_counts for s in again.sites]
    first, second = _labels_csv(tmp_path / "a" / "site-1"), _labels_csv(tmp_path / "b" / "site-1")
    assert first == second


def _write_npz(path: Path, images: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> Path:
    arrays = {f"{s}_images": a for s, a in images.items()}
    arrays.update({f"{s}_labels": a for s, a in labels.items()})
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    return path


def test_colour_and_sixteen_bit_npz_items_are_written_as_greyscale(tmp_path: Path) -> None:
    # Prepare: colour [N, H, W, 3] uint8 splits, and a uint16 [N, H, W, 1] file.
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test")
    colour = {s: rng.integers(0, 256, (3, 10, 12, 3), dtype=np.uint8) for s in splits}
    deep = {s: rng.integers(0, 4096, (2, 9, 7, 1), dtype=np.uint16) for s in splits}
    labels = {s: np.array([[0], [1], [1]]) for s in splits}
    colour_npz = _write_npz(tmp_path / "colour.npz", colour, labels)
    deep_npz = _write_npz(tmp_path / "deep.npz", deep, {s: np.array([0, 1]) for s in deep})
    # Execute
    first = import_dataset(colour_npz, tmp_path / "colour")
    second = import_dataset(deep_npz, tmp_path / "deep")
    # Assert
    assert first.colour_converted == 9 and any("greyscale" in n for n in first.notes)
    _assert_node_accepts(tmp_path / "colour")
    _assert_node_accepts(tmp_path / "deep")
    ds = pydicom.dcmread(tmp_path / "colour" / "dicom" / "IMP-000001" / "ST1" / "SE1" / "IM1.dcm")
    pillow = np.asarray(Image.fromarray(colour["train"][0]).convert("L"), dtype=np.int16)
    assert np.abs(ds.pixel_array.astype(np.int16) - pillow).max() <= 1
    ds = pydicom.dcmread(tmp_path / "deep" / "dicom" / "IMP-000004" / "ST1" / "SE1" / "IM1.dcm")
    assert ds.BitsAllocated == 16 and second.colour_converted == 0
    np.testing.assert_array_equal(ds.pixel_array, deep["val"][1][..., 0])


def test_npz_items_are_streamed_in_source_order_with_max_items(tmp_path: Path) -> None:
    # Prepare
    splits = ("train", "val", "test")
    images = {s: np.full((4, 5, 5), k, dtype=np.uint8) for k, s in enumerate(splits)}
    labels = {s: np.arange(4) % 2 for s in images}
    path = _write_npz(tmp_path / "x.npz", images, labels)
    # Execute
    plan = read_npz(path, max_items=6)
    items = list(plan.decode())
    # Assert: the first six items, train then val.
    assert plan.patients == 6 and plan.labels == (0, 1, 0, 1, 0, 1)
    assert [int(i.images[0][0, 0]) for i in items] == [0, 0, 0, 0, 1, 1]
    assert [i.patient for i in items] == list(range(6))


def test_to_greyscale_keeps_grey_saved_as_colour_and_converts_colour_with_bt601_luma() -> None:
    # Prepare
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    as_colour = np.stack([grey] * 3, axis=-1)
    colour = np.zeros((1, 3, 3), dtype=np.uint8)
    colour[0, 0] = (255, 0, 0)
    colour[0, 1] = (0, 255, 0)
    colour[0, 2] = (0, 0, 255)
    # Execute
    kept, converted_grey = to_greyscale(as_colour)
    luma, converted = to_greyscale(colour)
    # Assert
    np.testing.assert_array_equal(kept, grey)
    assert not converted_grey and converted
    assert luma.tolist() == [[76, 150, 29]]  # round(255 * 0.299), (* 0.587), (* 0.114)


# --- PNG / JPEG folders -----------------------------------------------------------------------


def _png_folder(root: Path, *, with_patient: bool = True) -> tuple[Path, dict[str, np.ndarray]]:
    rng = np.random.default_rng(1)
    root.mkdir(parents=True, exist_ok=True)
    (root / "sub").mkdir()
    pixels = {
        "a.png": rng.integers(0, 256, (16, 20), dtype=np.uint8),
        "sub/b.png": rng.integers(0, 256, (16, 20), dtype=np.uint8),
        "c.png": rng.integers(0, 65536, (12, 12), dtype=np.uint16),
        "d.png": rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
        "e.jpg": np.full((8, 8), 77, dtype=np.uint8),
    }
    for name, arr in pixels.items():
        Image.fromarray(arr).save(root / name)
    patients = {"a.png": "Doe^John", "sub/b.png": "Doe^John", "c.png": "MRN 1234567",
                "d.png": "x", "e.jpg": "y"}
    label = {"a.png": 1, "sub/b.png": 1, "c.png": 0, "d.png": 0, "e.jpg": 1}
    lines = ["image,patient,label" if with_patient else "image,label"]
    for name in pixels:
        lines.append(f"{name},{patients[name]},{label[name]}" if with_patient
                     else f"{name},{label[name]}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root, pixels


def test_png_folder_with_patients_gives_one_study_per_patient(tmp_path: Path) -> None:
    # Prepare
    folder, pixels = _png_folder(tmp_path / "src")
    # Execute
    summary = import_dataset(folder, tmp_path / "node")
    # Assert
    out = tmp_path / "node"
    _assert_node_accepts(out)
    rows = _labels_csv(out)
    assert {k: v[1] for k, v in rows.items()} == {
        "IMP-000001": 1, "IMP-000002": 0, "IMP-000003": 0, "IMP-000004": 1}
    assert summary.files == 5 and summary.patients == 4 and summary.colour_converted == 1
    first = sorted((out / "dicom" / "IMP-000001" / "ST1" / "SE1").glob("*.dcm"))
    assert len(first) == 2  # a.png and sub/b.png: one patient, one study, one series
    np.testing.assert_array_equal(pydicom.dcmread(first[0]).pixel_array, pixels["a.png"])
    np.testing.assert_array_equal(pydicom.dcmread(first[1]).pixel_array, pixels["sub/b.png"])
    deep = pydicom.dcmread(out / "dicom" / "IMP-000002" / "ST1" / "SE1" / "IM1.dcm")
    assert deep.BitsStored == 16
    np.testing.assert_array_equal(deep.pixel_array, pixels["c.png"])
    # No source id, file name or name fragment anywhere in the output.
    for path, ds in _headers(out):
        assert check_deidentified(ds).deidentified
        text = str(ds) + path.relative_to(out).as_posix()
        for secret in ("Doe", "John", "1234567", "a.png", "b.png", "sub/"):
            assert secret not in text
    assert "Doe" not in (out / "labels.csv").read_text()


def test_png_folder_without_patient_column_makes_each_image_a_patient(tmp_path: Path) -> None:
    # Prepare
    folder, _ = _png_folder(tmp_path / "src", with_patient=False)
    labels_csv = tmp_path / "elsewhere.csv"
    (folder / "labels.csv").rename(labels_csv)
    # Execute
    summary = import_dataset(folder, tmp_path / "node", labels_csv=labels_csv,
                             options=ImportOptions(max_images=4))
    # Assert
    _assert_node_accepts(tmp_path / "node")
    assert summary.patients == summary.files == 4
    assert summary.sites[0].label_counts == {0: 2, 1: 2}


_BAD_ROWS: list[tuple[str, str, str]] = [
    ("missing column", "image,diagnosis\na.png,1\n", "lacks the column(s) label"),
    ("unknown image", "image,label\na.png,1\nmissing_scan.png,0\n", "line 3"),
    ("non-integer label", "image,label\na.png,benign\n", "not an integer"),
    ("negative label", "image,label\na.png,-1\n", "negative"),
    ("path leaves folder", "image,label\n../outside.png,1\n", "leaves the image folder"),
    ("duplicate image", "image,label\na.png,1\n./a.png,1\n", "listed on line 2"),
    ("conflicting patient", "image,patient,label\na.png,Smith,1\nbad.png,Smith,0\n",
     "different label"),
    ("not an image suffix", "image,label\nnotes.txt,1\n", "not a .png"),
    ("empty CSV", "image,label\n", "lists no image"),
]


@pytest.mark.parametrize(("case", "text", "expected"), _BAD_ROWS, ids=[c[0] for c in _BAD_ROWS])
def test_bad_labels_csv_gives_one_actionable_error_without_values(
    case: str, text: str, expected: str, tmp_path: Path
) -> None:
    # Prepare
    folder = tmp_path / "src"
    folder.mkdir()
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(folder / "bad.png")
    (folder / "notes.txt").write_text("x")
    (folder / "labels.csv").write_text(text, encoding="utf-8")
    # Execute
    with pytest.raises(DataError) as caught:
        import_dataset(folder, tmp_path / "node")
    # Assert
    message = str(caught.value)
    assert expected in message
    assert message.count(";") >= 1  # what is wrong; what to do
    for value in ("missing_scan", "benign", "Smith", "outside", str(tmp_path)):
        assert value not in message
    assert not (tmp_path / "node").exists()


@pytest.mark.parametrize("corruption", ["garbage", "truncated", "gif named png"])
def test_corrupt_image_gives_a_line_numbered_error_and_leaves_no_output(
    corruption: str, tmp_path: Path
) -> None:
    # Prepare
    folder = tmp_path / "src"
    folder.mkdir()
    for k in range(3):
        Image.fromarray(np.full((32, 32), k, dtype=np.uint8)).save(folder / f"ok{k}.png")
    bad = folder / "scan.png"
    if corruption == "garbage":
        bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    elif corruption == "truncated":
        noise = np.random.default_rng(0).integers(0, 65536, (64, 64), dtype=np.uint16)
        Image.fromarray(noise).save(bad)
        bad.write_bytes(bad.read_bytes()[:2000])  # of about 8 kB
    else:
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(bad, format="GIF")
    rows = "image,label\nok0.png,0\nok1.png,1\nscan.png,1\nok2.png,0\n"
    (folder / "labels.csv").write_text(rows, encoding="utf-8")
    out = tmp_path / "node"
    # Execute
    with pytest.raises(DataError) as caught:
        import_dataset(folder, out)
    # Assert: the line is named, not the file; nothing half-written is left behind.
    assert "line 4 of the labels CSV" in str(caught.value)
    assert "scan" not in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert not out.exists()


@pytest.mark.parametrize(
    ("arrays", "expected"),
    [
        ({"train_images": np.zeros((2, 4, 4), np.uint8)}, "lacks the array(s) train_labels"),
        ({f"{s}_{k}": (np.zeros((2, 4, 4), np.uint8) if k == "images" else np.zeros((2, 3)))
          for s in ("train", "val", "test") for k in ("images", "labels")}, "multi-label"),
        ({f"{s}_{k}": (np.zeros((2, 4, 4), np.float32) if k == "images" else np.zeros(2))
          for s in ("train", "val", "test") for k in ("images", "labels")}, "not uint8"),
        ({f"{s}_{k}": (np.zeros((2, 4, 4), np.uint8) if k == "images" else np.full(2, 0.5))
          for s in ("train", "val", "test") for k in ("images", "labels")}, "not integers"),
        ({f"{s}_{k}": (np.zeros((2, 4, 4), np.uint8) if k == "images" else np.zeros(3))
          for s in ("train", "val", "test") for k in ("images", "labels")}, "different lengths"),
    ],
    ids=["missing keys", "multi-label", "float images", "fractional labels", "count mismatch"],
)
def test_bad_npz_gives_one_actionable_error(arrays: dict[str, np.ndarray], expected: str,
                                            tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    # Execute
    with pytest.raises(DataError) as caught:
        import_dataset(path, tmp_path / "node")
    # Assert
    assert expected in str(caught.value) and str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "node").exists()


def test_a_file_that_is_not_an_archive_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "fake.npz"
    path.write_bytes(b"not a zip file")
    # Execute / Assert
    with pytest.raises(DataError, match="cannot be read as a NumPy archive"):
        import_dataset(path, tmp_path / "node")


# --- the output folder ------------------------------------------------------------------------


def test_non_empty_output_is_refused_and_force_replaces_only_an_earlier_import(
    tmp_path: Path,
) -> None:
    # Prepare
    folder, _ = _png_folder(tmp_path / "src")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.dcm").write_bytes(b"keep me")
    out = tmp_path / "node"
    import_dataset(folder, out, options=ImportOptions(sites=2))
    # Execute / Assert: refused without --force, and for a folder no import wrote.
    with pytest.raises(ConfigError, match="not empty"):
        import_dataset(folder, out)
    with pytest.raises(ConfigError, match="holds no earlier vesalius import"):
        import_dataset(folder, foreign, options=ImportOptions(force=True))
    assert (foreign / "precious.dcm").read_bytes() == b"keep me"
    # --force over an earlier import: the sites are replaced by one node folder.
    summary = import_dataset(folder, out, options=ImportOptions(force=True))
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "dicom", "labels.csv"]
    assert json.loads((out / MARKER).read_text())["entries"] == ["dicom", "labels.csv"]
    assert summary.sites[0].site is None
    _assert_node_accepts(out)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"split": "dirichlet"}, "give --sites"),
        ({"alpha": 0.0, "sites": 2}, "--alpha"),
        ({"sites": 0}, "--sites"),
        ({"max_images": 0}, "--max-images"),
        ({"pixel_spacing_mm": float("nan")}, "--pixel-spacing"),
    ],
)
def test_invalid_options_are_config_errors(options: dict[str, object], expected: str) -> None:
    # Execute / Assert
    with pytest.raises(ConfigError, match=re.escape(expected)):
        ImportOptions(**options)  # type: ignore[arg-type]


def test_more_sites_than_patients_is_refused(tmp_path: Path) -> None:
    # Prepare
    folder, _ = _png_folder(tmp_path / "src")
    # Execute / Assert
    with pytest.raises(ConfigError, match="needs at least 5 patients"):
        import_dataset(folder, tmp_path / "node", options=ImportOptions(sites=5))
    assert not (tmp_path / "node").exists()


def test_a_damaged_archive_is_a_data_error_and_leaves_no_output(tmp_path: Path) -> None:
    # Prepare: a valid compressed file with bytes flipped inside its first member.
    rng = np.random.default_rng(0)
    splits = ("train", "val", "test")
    arrays = {f"{s}_images": rng.integers(0, 256, (20, 16, 16), dtype=np.uint8) for s in splits}
    arrays.update({f"{s}_labels": np.zeros((20, 1), np.uint8) for s in splits})
    path = tmp_path / "damaged.npz"
    np.savez_compressed(path, **arrays)  # type: ignore[arg-type]
    data = bytearray(path.read_bytes())
    data[600:900] = bytes(b ^ 0x5A for b in data[600:900])
    path.write_bytes(bytes(data))
    # Execute
    with pytest.raises(DataError, match="damaged|ends early") as caught:
        import_dataset(path, tmp_path / "node")
    # Assert
    assert str(tmp_path) not in str(caught.value)
    assert not (tmp_path / "node").exists()


def test_an_output_folder_under_a_file_is_a_config_error(tmp_path: Path) -> None:
    # Prepare
    folder, _ = _png_folder(tmp_path / "src")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    # Execute / Assert
    with pytest.raises(ConfigError, match="cannot be created"):
        import_dataset(folder, blocker / "node")
    with pytest.raises(ConfigError, match="names a file"):
        import_dataset(folder, blocker)


def test_reimporting_the_same_source_gives_the_same_dataset_fingerprint(tmp_path: Path) -> None:
    # Prepare: one source imported twice into two folders, and once with one label changed
    from client.dicom.ingest import scan_data_dir

    folder, _ = _png_folder(tmp_path / "src")
    import_dataset(folder, tmp_path / "first")
    import_dataset(folder, tmp_path / "second")
    csv_path = folder / "labels.csv"
    csv_path.write_text(csv_path.read_text().replace("c.png,MRN 1234567,0", "c.png,MRN 1234567,1"))
    import_dataset(folder, tmp_path / "relabelled")
    # Execute
    prints = [scan_data_dir(tmp_path / name)[1].fingerprint
              for name in ("first", "second", "relabelled")]
    # Assert: the same data is the same dataset for the ledger (its budget goes on counting)
    assert prints[0] == prints[1]
    assert prints[2] != prints[0]
