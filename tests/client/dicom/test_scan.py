"""Header-only scanner: every file is usable or skipped with a stable reason code."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEGLosslessSV1, generate_uid

from client.dicom.reasons import SkipCode, SkippedFile
from client.dicom.scan import classify_file, expected_pixel_bytes, scan_directory
from tests.client.dicom._factory import copy_testdata, make_dataset, write_dataset, write_image


def _codes(data_dir: Path, *, require_deidentified: bool = True) -> dict[str, str]:
    outcome = scan_directory(data_dir, require_deidentified=require_deidentified)
    codes = {s.relpath: s.code.value for s in outcome.skipped}
    codes.update({r.relpath: "ok" for r in outcome.records})
    return codes


def test_valid_file_is_usable_with_header_fields(tmp_path: Path) -> None:
    # Prepare
    ds = write_image(tmp_path / "a.dcm", patient_id="P1", instance_number=7)
    # Execute
    result = classify_file(tmp_path / "a.dcm", "a.dcm", require_deidentified=True)
    # Assert
    assert not isinstance(result, SkippedFile)
    assert result.patient_id == "P1"
    assert result.sop_instance_uid == ds.SOPInstanceUID
    assert result.instance_number == 7
    assert (result.rows, result.columns, result.number_of_frames) == (16, 16, 1)
    assert result.file_size == (tmp_path / "a.dcm").stat().st_size


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


@pytest.mark.parametrize(
    ("name", "build", "code"),
    [
        ("random.dcm", lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), "not-dicom"),
        ("empty.dcm", lambda p: p.write_bytes(b""), "not-dicom"),
        ("notes.txt", lambda p: p.write_text("hello, not an image\n" * 20), "not-dicom"),
        (
            "fake_prefix.dcm",
            lambda p: p.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 64),
            "not-dicom",
        ),
        (
            "truncated.dcm",
            lambda p: (write_image(p), _truncate(p, p.stat().st_size - 200)),
            "truncated",
        ),
        ("nopix.dcm", lambda p: _write_without_pixels(p), "no-pixels"),
        ("phi.dcm", lambda p: write_image(p, deidentified=False), "phi"),
        ("nouid.dcm", lambda p: _write_without_study_uid(p), "missing-uid"),
        ("jpeg-ll.dcm", lambda p: copy_testdata("JPEG-LL.dcm", p), "unsupported-transfer-syntax"),
        ("rgb.dcm", lambda p: copy_testdata("SC_rgb_small_odd.dcm", p), "unsupported-image"),
    ],
)
def test_bad_file_gets_expected_code(tmp_path: Path, name: str, build: object, code: str) -> None:
    # Prepare
    path = tmp_path / name
    build(path)  # type: ignore[operator]
    require = code == "phi"
    # Execute
    result = classify_file(path, name, require_deidentified=require)
    # Assert
    assert isinstance(result, SkippedFile)
    assert result.code.value == code
    assert str(tmp_path) not in result.text


def _write_without_pixels(path: Path) -> None:
    ds = make_dataset()
    del ds.PixelData
    write_dataset(ds, path)


def _write_without_study_uid(path: Path) -> None:
    ds = make_dataset()
    del ds.StudyInstanceUID
    write_dataset(ds, path)


def test_jpeg_lossless_syntax_declared_on_factory_file_is_unsupported(tmp_path: Path) -> None:
    # Prepare: encapsulated-looking pixel data under JPEG Lossless (no decoder installed here;
    # JPEG-LS decodes since highdicom brought pyjpegls)
    ds = make_dataset()
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    from pydicom.encaps import encapsulate

    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\0" * 60])
    write_dataset(ds, tmp_path / "j2k.dcm")
    # Execute
    result = classify_file(tmp_path / "j2k.dcm", "j2k.dcm", require_deidentified=True)
    # Assert
    assert isinstance(result, SkippedFile)
    assert result.code is SkipCode.UNSUPPORTED_TRANSFER_SYNTAX


def test_truncated_in_header_never_raises(tmp_path: Path) -> None:
    # Prepare: cut at many offsets through a valid file
    path = tmp_path / "full.dcm"
    write_image(path)
    data = path.read_bytes()
    # Execute / Assert
    for keep in range(0, len(data), 37):
        cut = tmp_path / f"cut{keep}.dcm"
        cut.write_bytes(data[:keep])
        result = classify_file(cut, cut.name, require_deidentified=True)
        assert isinstance(result, SkippedFile), keep
        assert result.code in {SkipCode.NOT_DICOM, SkipCode.TRUNCATED, SkipCode.MISSING_UID,
                               SkipCode.PHI, SkipCode.NO_PIXELS}


def test_duplicate_sop_uid_second_file_skipped(tmp_path: Path) -> None:
    # Prepare
    uid = generate_uid()
    write_image(tmp_path / "a.dcm", sop_uid=uid)
    write_image(tmp_path / "b.dcm", sop_uid=uid)
    # Execute
    codes = _codes(tmp_path)
    # Assert
    assert codes == {"a.dcm": "ok", "b.dcm": "duplicate"}


def test_hidden_files_and_labels_csv_ignored(tmp_path: Path) -> None:
    # Prepare
    write_image(tmp_path / "sub" / "a.dcm")
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / ".hidden").mkdir()
    write_image(tmp_path / ".hidden" / "b.dcm")
    (tmp_path / "labels.csv").write_text("patient_id,study_uid,label\n")
    # Execute
    outcome = scan_directory(tmp_path, exclude=("labels.csv",))
    # Assert
    assert outcome.files_seen == 1
    assert [r.relpath for r in outcome.records] == ["sub/a.dcm"]


def test_progress_callback_counts_every_file(tmp_path: Path) -> None:
    # Prepare
    for i in range(3):
        write_image(tmp_path / f"{i}.dcm")
    (tmp_path / "junk.bin").write_bytes(b"x")
    calls: list[tuple[int, int]] = []
    # Execute
    scan_directory(tmp_path, progress=lambda done, total: calls.append((done, total)))
    # Assert
    assert calls == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_scan_never_decodes_pixels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: any pixel decoding would raise
    write_image(tmp_path / "a.dcm")

    def _boom(self: Dataset) -> None:
        raise AssertionError("pixel data decoded during scan")

    monkeypatch.setattr(Dataset, "pixel_array", property(_boom))
    # Execute
    outcome = scan_directory(tmp_path)
    # Assert
    assert len(outcome.records) == 1


def test_pydicom_examples_mixed_with_junk(tmp_path: Path) -> None:
    # Prepare: valid examples + known-bad examples + junk, nested
    valid = ["CT_small.dcm", "MR_small.dcm", "liver_1frame.dcm"]
    for name in valid:
        copy_testdata(name, tmp_path / "good" / name)
    expected_bad = {
        "bad/MR_truncated.dcm": "truncated",
        "bad/JPEG-LL.dcm": "unsupported-transfer-syntax",  # JPEG Lossless: no decoder here
        "bad/rtplan.dcm": "no-pixels",
        "bad/no_meta.dcm": "not-dicom",
        "bad/SC_rgb_small_odd.dcm": "unsupported-image",
        # MR_small_RLE.dcm has the same (0008,0018) SOP Instance UID as MR_small.dcm
        "good/MR_small_RLE.dcm": "duplicate",
    }
    for rel in expected_bad:
        copy_testdata(Path(rel).name, tmp_path / rel)
    (tmp_path / "bad" / "random.bin").write_bytes(os.urandom(1000))
    (tmp_path / "bad" / "readme.txt").write_text("not dicom")
    expected_bad.update({"bad/random.bin": "not-dicom", "bad/readme.txt": "not-dicom"})
    # Execute
    outcome = scan_directory(tmp_path, require_deidentified=False)
    # Assert
    assert outcome.files_seen == len(valid) + len(expected_bad)
    assert sorted(r.relpath for r in outcome.records) == sorted(f"good/{n}" for n in valid)
    assert {s.relpath: s.code.value for s in outcome.skipped} == expected_bad


def test_pydicom_examples_are_phi_when_deidentification_required(tmp_path: Path) -> None:
    # Prepare: the bundled examples do not set (0012,0062) Patient Identity Removed
    copy_testdata("CT_small.dcm", tmp_path / "ct.dcm")
    # Execute
    outcome = scan_directory(tmp_path, require_deidentified=True)
    # Assert
    assert [s.code for s in outcome.skipped] == [SkipCode.PHI]


def test_expected_pixel_bytes_formula() -> None:
    # Prepare
    ds = make_dataset()
    # Execute / Assert
    assert expected_pixel_bytes(ds, 16, 16, 1) == 16 * 16 * 2
    assert expected_pixel_bytes(ds, 16, 16, 3) == 16 * 16 * 2 * 3
    ds.BitsAllocated = 1
    assert expected_pixel_bytes(ds, 3, 3, 1) == 2


def test_skip_texts_hold_no_tag_values(tmp_path: Path) -> None:
    # Prepare
    write_image(tmp_path / "phi.dcm", patient_id="SECRET-ID", deidentified=False)
    # Execute
    outcome = scan_directory(tmp_path)
    # Assert
    texts = [s.text for s in outcome.skipped]
    assert texts and all("SECRET" not in t and "General Hospital" not in t for t in texts)
