"""Hostile DICOM input: every case of issue 13 (deliverable 3), built by mutating files.

Each file is classified (used or skipped with a code), the scanner never raises, no value
reaches a reason text, stderr or a log line, and training's decoder fails only with a
:class:`~common.errors.DataError`.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from client.dicom.ingest import scan_data_dir
from client.dicom.pixels import DecodeCause, PixelDecodeError, read_pixels
from client.dicom.reasons import SkipCode, SkippedFile
from client.dicom.scan import classify_file, scan_directory
from common.errors import DataError
from tests.client.dicom._factory import copy_testdata, make_dataset, write_dataset, write_image

SECRET = "SECRET-4711"


def _skip(path: Path, *, require: bool = True, decode: bool = False) -> SkippedFile:
    result = classify_file(path, path.name, require_deidentified=require, decode_pixels=decode)
    assert isinstance(result, SkippedFile), result
    return result


def _element(tag: tuple[int, int], vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", *tag) + vr + struct.pack("<H", len(value)) + value


# --- pydicom's warnings never reach stderr or the log ----------------------------------


def _write_invalid_values(path: Path) -> None:
    ds = make_dataset(patient_id="PSEUDO-001")
    ds.NumberOfFrames = "1"
    write_dataset(ds, path)
    raw = path.read_bytes()
    bad_uid = b"05fa52f0" + SECRET.encode()[:8]  # 16 bytes, not a UID
    uid = ds.SOPInstanceUID.encode() + b"\0" * (len(ds.SOPInstanceUID) % 2)
    old = _element((0x0008, 0x0018), b"UI", uid)
    assert old in raw
    raw = raw.replace(old, _element((0x0008, 0x0018), b"UI", bad_uid))
    frames = (0x0028, 0x0008)
    raw = raw.replace(_element(frames, b"IS", b"1 "), _element(frames, b"IS", b"1A"))
    path.write_bytes(raw)


def test_scan_and_decode_emit_no_pydicom_warning_or_log_line(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: an invalid UI value (quoted by pydicom's warning) and an IS value '1A'
    _write_invalid_values(tmp_path / "bad.dcm")
    caplog.set_level(logging.DEBUG)
    # Execute
    with warnings.catch_warnings(record=True) as outer:
        warnings.simplefilter("always")
        outcome = scan_directory(tmp_path, decode_pixels=True)
        with pytest.raises(DataError):
            read_pixels(tmp_path / "bad.dcm")
    # Assert
    err = capfd.readouterr().err
    assert "05fa52f0" not in err and SECRET[:6] not in err and "Invalid value" not in err
    assert not [w for w in outer if "pydicom" in (w.filename or "") or "VR" in str(w.message)]
    assert all("05fa52f0" not in r.getMessage() for r in caplog.records)
    assert any("pydicom messages withheld" in r.getMessage() for r in caplog.records)
    assert [s.code for s in outcome.skipped] == [SkipCode.INVALID_VALUE]


# --- duplicated elements ---------------------------------------------------------------


def test_duplicated_patient_id_is_refused_without_its_values(tmp_path: Path) -> None:
    # Prepare: a second (0010,0020) with another value right after the first
    path = tmp_path / "dup.dcm"
    write_image(path, patient_id="PSEUDO-001")
    first = _element((0x0010, 0x0020), b"LO", b"PSEUDO-001")
    raw = path.read_bytes()
    assert first in raw
    path.write_bytes(raw.replace(first, first + _element((0x0010, 0x0020), b"LO", b"PSEUDO-999")))
    assert pydicom.dcmread(path).PatientID == "PSEUDO-999"  # what pydicom alone would file
    # Execute
    skipped = _skip(path)
    # Assert
    assert skipped.code is SkipCode.DUPLICATE_ELEMENT
    assert "(0010,0020) Patient ID" in skipped.text
    assert "PSEUDO" not in skipped.text


def test_any_duplicated_element_is_refused(tmp_path: Path) -> None:
    # Prepare: (0008,0060) Modality twice with the same value
    path = tmp_path / "dup.dcm"
    write_image(path)
    modality = _element((0x0008, 0x0060), b"CS", b"CT")
    raw = path.read_bytes()
    path.write_bytes(raw.replace(modality, modality + modality))
    # Execute / Assert
    assert "(0008,0060)" in _skip(path).text


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (b"PID-aaaaaaaa01\\PID-bbbbbbbb02", "several values"),
        (b"PID-cccccccc03\x00PID-dd", "control or NUL"),
        (b"PID-ffffffff05\xff\xfe", "default repertoire"),
        (b"PID-" + b"9" * 80, "longer than 64"),
    ],
)
def test_malformed_patient_id_is_refused_not_re_filed(
    tmp_path: Path, value: bytes, words: str
) -> None:
    # Prepare: the (0010,0020) value bytes replaced (pad to even length)
    path = tmp_path / "pid.dcm"
    write_image(path, patient_id="PSEUDO-001")
    raw = path.read_bytes()
    padded = value + b" " * (len(value) % 2)
    path.write_bytes(
        raw.replace(_element((0x0010, 0x0020), b"LO", b"PSEUDO-001"),
                    _element((0x0010, 0x0020), b"LO", padded))
    )
    # Execute
    skipped = _skip(path, require=False)
    # Assert
    assert skipped.code is SkipCode.INVALID_VALUE
    assert "(0010,0020) Patient ID" in skipped.text and words in skipped.text
    assert "PID-" not in skipped.text


# --- byte order and encapsulation ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "declared"),
    [("CT_small.dcm", ExplicitVRBigEndian), ("MR_small_bigendian.dcm", ExplicitVRLittleEndian)],
)
def test_header_relabelled_to_the_other_byte_order_is_refused(
    tmp_path: Path, name: str, declared: str
) -> None:
    # Prepare: the two UIDs have the same length, so only the meta value changes
    path = copy_testdata(name, tmp_path / name)
    old = str(pydicom.dcmread(path).file_meta.TransferSyntaxUID).encode()
    raw = path.read_bytes()
    path.write_bytes(raw.replace(old, str(declared).encode(), 1))
    # Execute
    skipped = _skip(path, require=False)
    # Assert
    assert skipped.code is SkipCode.TRANSFER_SYNTAX_MISMATCH


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "MR_small_bigendian.dcm"])
def test_pixels_left_in_the_other_byte_order_are_refused(tmp_path: Path, name: str) -> None:
    # Prepare: the header re-encoded in the other byte order, the OW pixel bytes untouched
    ds = pydicom.dcmread(copy_testdata(name, tmp_path / "src" / name))
    little = not ds.file_meta.TransferSyntaxUID.is_little_endian
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    path = tmp_path / name
    pydicom.dcmwrite(path, ds, implicit_vr=False, little_endian=little, force_encoding=True)
    # Execute
    relabelled = _skip(path, require=False)
    original = classify_file(tmp_path / "src" / name, name, require_deidentified=False)
    # Assert
    assert relabelled.code is SkipCode.TRANSFER_SYNTAX_MISMATCH
    assert "byte order" in relabelled.text
    assert not isinstance(original, SkippedFile)


def test_native_pixels_under_a_compressed_syntax_are_refused(tmp_path: Path) -> None:
    # Prepare: RLE Lossless (decodable here, a UID as long as Explicit VR Little Endian's)
    # declared in the meta, the pixel data left native
    path = tmp_path / "a.dcm"
    write_image(path)
    raw = path.read_bytes()
    assert len(str(RLELossless)) == len(str(ExplicitVRLittleEndian))
    native, rle = str(ExplicitVRLittleEndian).encode(), str(RLELossless).encode()
    path.write_bytes(raw.replace(native, rle, 1))
    # Execute / Assert
    assert _skip(tmp_path / "a.dcm").code is SkipCode.TRANSFER_SYNTAX_MISMATCH


def test_encapsulated_pixels_under_a_native_syntax_are_refused(tmp_path: Path) -> None:
    # Prepare
    ds = pydicom.dcmread(copy_testdata("MR_small_jp2klossless.dcm", tmp_path / "src.dcm"))
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "a.dcm", ds, implicit_vr=False, little_endian=True)
    # Execute
    skipped = _skip(tmp_path / "a.dcm", require=False)
    # Assert
    assert skipped.code is SkipCode.TRANSFER_SYNTAX_MISMATCH
    assert "encapsulated" in skipped.text


def test_trailing_padding_after_native_pixel_data_is_tolerated(tmp_path: Path) -> None:
    # Prepare: pydicom's MR_small_padded.dcm has 128 bytes after the announced pixels
    path = copy_testdata("MR_small_padded.dcm", tmp_path / "padded.dcm")
    # Execute
    result = classify_file(path, "padded.dcm", require_deidentified=False, decode_pixels=True)
    # Assert
    assert not isinstance(result, SkippedFile)
    assert (result.rows, result.columns) == (64, 64)


# --- invalid IS / DS values ------------------------------------------------------------


@pytest.mark.parametrize(
    ("keyword", "value", "tag"),
    [
        ("NumberOfFrames", "1A", "(0028,0008)"),
        ("InstanceNumber", "7x", "(0020,0013)"),
        ("RescaleSlope", "abc", "(0028,1053)"),
        ("RescaleIntercept", "nan", "(0028,1052)"),
    ],
)
def test_invalid_is_ds_values_are_named_by_tag(
    tmp_path: Path, keyword: str, value: str, tag: str
) -> None:
    # Prepare: a valid placeholder of the same length, then the raw bytes overwritten
    ds = make_dataset()
    setattr(ds, keyword, "1" * len(value))
    write_dataset(ds, tmp_path / "bad.dcm")
    number = tag_for_keyword(keyword)
    assert number is not None
    pad = b" " * (len(value) % 2)
    vr = str(dictionary_VR(number)).encode()
    group_element = (number >> 16, number & 0xFFFF)
    raw = (tmp_path / "bad.dcm").read_bytes()
    placeholder = _element(group_element, vr, b"1" * len(value) + pad)
    assert placeholder in raw
    (tmp_path / "bad.dcm").write_bytes(
        raw.replace(placeholder, _element(group_element, vr, value.encode() + pad))
    )
    # Execute
    skipped = _skip(tmp_path / "bad.dcm")
    with pytest.raises(PixelDecodeError) as info:
        read_pixels(tmp_path / "bad.dcm")
    # Assert
    assert skipped.code is SkipCode.INVALID_VALUE
    assert tag in skipped.text and value not in skipped.text
    assert info.value.cause is DecodeCause.INVALID_VALUE and tag in str(info.value)


# --- decode check ----------------------------------------------------------------------


def _j2k_header(width: int, height: int) -> bytes:
    """A JPEG 2000 codestream start: SOC + SIZ declaring ``width`` x ``height``, 1 component."""
    siz = struct.pack(">HHIIIIIIIIH", 41, 0, width, height, 0, 0, width, height, 0, 0, 1)
    return b"\xff\x4f\xff\x51" + siz + bytes([15, 1, 1]) + b"\xff\xd9"


@pytest.mark.parametrize(
    ("build", "cause", "words"),
    [
        (lambda p: copy_testdata("JPGExtended.dcm", p), DecodeCause.DECODER_MISSING, "decoder"),
        (lambda p: copy_testdata("JPEG-lossy.dcm", p), DecodeCause.DECODER_MISSING, "decoder"),
        (lambda p: _write_bomb(p), DecodeCause.TOO_LARGE, "safety limit"),
    ],
)
def test_undecodable_files_pass_the_header_scan_and_fail_the_decode_check(
    tmp_path: Path, build: object, cause: DecodeCause, words: str
) -> None:
    # Prepare (12-bit JPEG Extended: Pillow, the only JPEG plugin here, cannot decode it)
    path = tmp_path / "x.dcm"
    build(path)  # type: ignore[operator]
    # Execute
    header_only = classify_file(path, "x.dcm", require_deidentified=False)
    decoded = classify_file(path, "x.dcm", require_deidentified=False, decode_pixels=True)
    with pytest.raises(DataError) as info:  # the training path: a DataError, never a crash
        read_pixels(path)
    # Assert
    assert not isinstance(header_only, SkippedFile)
    assert isinstance(decoded, SkippedFile) and decoded.code is SkipCode.UNDECODABLE
    assert words in decoded.text and str(tmp_path) not in decoded.text
    assert isinstance(info.value, PixelDecodeError) and info.value.cause is cause
    assert str(tmp_path) not in str(info.value) and str(info.value) == info.value.safe_reason


def _write_bomb(path: Path) -> None:
    ds = make_dataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([_j2k_header(20000, 20000)])
    write_dataset(ds, path)


def test_report_says_whether_pixels_were_decoded(tmp_path: Path) -> None:
    # Prepare
    write_image(tmp_path / "ok.dcm")
    _write_bomb(tmp_path / "bomb.dcm")
    # Execute
    _, header_only = scan_data_dir(tmp_path)
    _, decoded = scan_data_dir(tmp_path, decode_pixels=True)
    # Assert
    assert header_only.to_dict()["pixels_checked"] == "header only"
    assert header_only.files_used == 2
    assert decoded.to_dict()["pixels_checked"] == "decoded"
    assert decoded.files_used == 1 and decoded.skip_counts["undecodable"] == 1


# --- every file classified, no value in any text ---------------------------------------


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8))
def test_random_byte_mutations_are_always_classified_without_values(
    tmp_path: Path, flips: list[tuple[int, int]]
) -> None:
    # Prepare: a valid file whose identifiers hold a recognisable secret, bytes overwritten
    path = tmp_path / "m.dcm"
    write_image(path, patient_id=SECRET)
    data = bytearray(path.read_bytes())
    for offset, value in flips:
        data[offset % len(data)] = value
    path.write_bytes(bytes(data))
    # Execute
    result = classify_file(path, "m.dcm", require_deidentified=True, decode_pixels=True)
    # Assert
    if isinstance(result, SkippedFile):
        assert result.code in set(SkipCode)
        assert SECRET not in result.text and "SECRET" not in result.text
    else:
        assert result.rows >= 1 and result.columns >= 1


def test_pixel_sample_check_accepts_noisy_and_flat_images(tmp_path: Path) -> None:
    # Prepare: uniform noise (rougher when swapped) and a constant image
    write_image(tmp_path / "noise.dcm")
    write_image(tmp_path / "flat.dcm", pixels=np.full((16, 16), 300, dtype=np.uint16))
    # Execute
    outcome = scan_directory(tmp_path)
    # Assert
    assert outcome.skipped == () and len(outcome.records) == 2


def test_report_counts_declared_deidentification_options(tmp_path: Path) -> None:
    # Prepare: one file declaring the Basic Profile and Clean Descriptors, one declaring none
    declared = make_dataset()
    item_a, item_b = pydicom.Dataset(), pydicom.Dataset()
    for item, code in ((item_a, "113100"), (item_b, "113105")):
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code, "DCM", "x"
    declared.DeidentificationMethodCodeSequence = pydicom.Sequence([item_a, item_b])
    declared.StudyDescription = "CHEST"
    write_dataset(declared, tmp_path / "a.dcm")
    write_image(tmp_path / "b.dcm")
    # Execute
    _, report = scan_data_dir(tmp_path)
    doc = report.to_dict()
    # Assert
    assert report.files_used == 2
    assert doc["deidentification_options"] == {
        "Basic Application Confidentiality Profile": 1,
        "Clean Descriptors Option": 1,
    }
    assert "Retain UIDs Option" in doc["deidentification_rule"]["assumed_options"]


@pytest.mark.parametrize("high_bit", [40, 3, 16])
def test_high_bit_must_be_one_less_than_bits_stored(tmp_path: Path, high_bit: int) -> None:
    # Prepare: a valid 16-bit image whose (0028,0102) High Bit contradicts Bits Stored 16
    ds = make_dataset()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, high_bit
    write_dataset(ds, tmp_path / "bad.dcm")
    # Execute
    skipped = _skip(tmp_path / "bad.dcm")
    # Assert: refused, the tag named
    assert skipped.code is SkipCode.UNSUPPORTED_IMAGE and "(0028,0102) High Bit" in skipped.text


def test_a_consistent_high_bit_is_accepted(tmp_path: Path) -> None:
    ds = make_dataset()
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
    write_dataset(ds, tmp_path / "ok.dcm")
    result = classify_file(tmp_path / "ok.dcm", "ok.dcm", require_deidentified=True)
    assert not isinstance(result, SkippedFile), result
