"""Property-based mutations of real DICOM files: no crash, all classified, nothing re-filed, no leak.

Each test mutates one de-identified-looking copy of a pydicom example file (planted random
identifiers) and runs :func:`tests.hostile._case.run_case`, which states the common
requirements; some mutations add their own (a duplicated or corrupted (0010,0020) Patient
ID, a missing required element, a truncated file: the file must be skipped).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from client.dicom.reasons import SkipCode
from tests.hostile._case import assert_skipped, neighbours, run_case
from tests.hostile._mutate import (
    COMPRESSED_BASES,
    NATIVE_BASES,
    PATIENT_ID,
    PIXEL_DATA,
    Planted,
    encode_element,
    remove,
    set_length,
    set_value,
    spans,
    token,
    with_transfer_syntax,
)
from tests.hostile.conftest import HOSTILE

Bases = dict[str, tuple[Planted, bytes]]
NATIVE = st.sampled_from(NATIVE_BASES)
#: One explicit-VR and one implicit-VR base for the enumerated (parametrised) mutations.
TWO_BASES = ("CT_small.dcm", "MR_small_implicit.dcm")


def _regions(data: bytes) -> tuple[list[int], range]:
    """Header offsets (after the preamble, outside the Patient ID value) and the pixel range."""
    sp = spans(data)
    pixels = sp[int(PIXEL_DATA)]
    pid = sp[int(PATIENT_ID)]
    header = [i for i in range(128, pixels.start)
              if not pid.value_start <= i < pid.end]
    return header, range(pixels.value_start, pixels.end)


@HOSTILE
@given(base=NATIVE, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                   min_size=1, max_size=4))
def test_header_byte_flips(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                           flips: list[tuple[int, int]]) -> None:
    # Prepare: XOR 1-4 header bytes (tags, VRs, lengths, values; never the Patient ID value,
    # whose silent change no reader could detect)
    planted, data = bases[base]
    header, _ = _regions(data)
    buf = bytearray(data)
    for pos, xor in flips:
        buf[header[pos % len(header)]] ^= xor
    # Execute / Assert
    run_case(capfd, f"{base} header flips {flips}", bytes(buf), planted, neighbours(bases, base))


@HOSTILE
@given(base=NATIVE, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)),
                                   min_size=1, max_size=8))
def test_pixel_byte_flips(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                          flips: list[tuple[int, int]]) -> None:
    # Prepare
    planted, data = bases[base]
    _, pixels = _regions(data)
    buf = bytearray(data)
    for pos, xor in flips:
        buf[pixels[pos % len(pixels)]] ^= xor
    # Execute / Assert
    run_case(capfd, f"{base} pixel flips {flips}", bytes(buf), planted, neighbours(bases, base))


@HOSTILE
@given(base=st.sampled_from((*NATIVE_BASES, *COMPRESSED_BASES)), cut=st.integers(0, 10**6))
def test_truncation(capfd: pytest.CaptureFixture[str], bases: Bases, base: str, cut: int) -> None:
    # Prepare
    planted, data = bases[base]
    keep = cut % len(data)
    # Execute
    outcome = run_case(capfd, f"{base} truncated to {keep} of {len(data)} bytes", data[:keep],
                       planted, neighbours(bases, base))
    # Assert: a file cut anywhere before its end is never used (pixel data is last here)
    assert_skipped(outcome, f"{base} truncated to {keep} of {len(data)} bytes")


@HOSTILE
@given(base=NATIVE, where=st.integers(0, 10**6), in_pixels=st.booleans(),
       junk=st.binary(min_size=1, max_size=64))
def test_insertions(capfd: pytest.CaptureFixture[str], bases: Bases, base: str, where: int,
                    in_pixels: bool, junk: bytes) -> None:
    # Prepare
    planted, data = bases[base]
    header, pixels = _regions(data)
    at = pixels[where % len(pixels)] if in_pixels else header[where % len(header)]
    mutated = data[:at] + junk + data[at:]
    # Execute / Assert
    run_case(capfd, f"{base}: {junk!r} inserted at {at}", mutated, planted, neighbours(bases, base))


@pytest.mark.parametrize("before", [False, True], ids=["after", "before"])
@pytest.mark.parametrize("base", NATIVE_BASES)
def test_duplicated_patient_id(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                               before: bool) -> None:
    # Prepare: a second (0010,0020) element with another patient's id
    planted, data = bases[base]
    pid = spans(data)[int(PATIENT_ID)]
    other = token(random.Random(base), "PID")
    extra = encode_element(pid, int(PATIENT_ID), "LO", other.encode())
    at = pid.start if before else pid.end
    mutated = data[:at] + extra + data[at:]
    what = f"{base}: (0010,0020) duplicated {'before' if before else 'after'} with {other}"
    # Execute
    outcome = run_case(capfd, what, mutated, planted, neighbours(bases, base), secrets=[other])
    # Assert: never indexed under either id
    assert_skipped(outcome, what)


BAD_PATIENT_IDS = [
    b"PID-aaaaaaaa01\\PID-bbbbbbbb02",  # two values (VM 2) in a VM 1 attribute
    b"PID-cccccccc03\x00PID-dd",  # NUL inside the value
    b"PID-eeeeeeee04\x07\x08",  # control characters
    b"PID-ffffffff05\xff\xfe",  # bytes outside the default character repertoire
    b"",  # empty
    b"    ",  # blank
    b"PID-" + b"9" * 80,  # longer than LO allows (64)
]


@pytest.mark.parametrize("bad", BAD_PATIENT_IDS, ids=range(len(BAD_PATIENT_IDS)))
@pytest.mark.parametrize("base", TWO_BASES)
def test_corrupt_patient_id(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                            bad: bytes) -> None:
    # Prepare
    planted, data = bases[base]
    mutated = set_value(data, spans(data)[int(PATIENT_ID)], bad)
    shown = bad.decode("latin-1")
    secrets = [part for part in shown.replace("\x00", "\\").split("\\") if len(part) >= 8]
    what = f"{base}: (0010,0020) = {bad!r}"
    # Execute
    outcome = run_case(capfd, what, mutated, planted, neighbours(bases, base), secrets=secrets)
    # Assert
    assert_skipped(outcome, what)


SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit, JPEG2000Lossless, RLELossless,
    JPEGLSLossless, "1.2.840.10008.1.2.4.999", "1.2.3.NOT.A.UID", "", None,
]


@pytest.mark.parametrize("syntax", SYNTAXES, ids=[repr(s) for s in SYNTAXES])
@pytest.mark.parametrize("base", (*NATIVE_BASES, *COMPRESSED_BASES))
def test_relabelled_transfer_syntax(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                                    syntax: str | None) -> None:
    # Prepare: (0002,0010) says one thing, the data set is encoded another way
    planted, data = bases[base]
    mutated = with_transfer_syntax(data, None if syntax is None else str(syntax))
    # Execute / Assert
    run_case(capfd, f"{base} relabelled as {syntax!r}", mutated, planted, neighbours(bases, base))


def _bad_values(planted: Planted) -> list[tuple[str, bytes]]:
    """(keyword, raw value) pairs that break the VR of the attribute."""
    return [
        ("StudyInstanceUID", f"{planted.study_uid}.ABC".encode()),  # UI with letters
        ("SeriesInstanceUID", f"{planted.series_uid}..".encode()),
        ("SOPInstanceUID", f"{planted.sop_uid}.{'9' * 60}".encode()),  # longer than 64
        ("InstanceNumber", b"1A"),  # IS
        ("RescaleSlope", b"abc"),  # DS garbage
        ("RescaleSlope", b"nan"),
        ("RescaleSlope", b"1e999"),
        ("RescaleIntercept", b"1,5"),
        ("RescaleIntercept", b"-"),
        ("Rows", b"\x40"),  # US of 1 byte (padded to 2)
        ("Rows", b""),
        ("BitsAllocated", b"\x00\x00\x10\x00"),  # US with two values
        ("PhotometricInterpretation", b"MONOCHROME2\\RGB"),
        ("SamplesPerPixel", b"\x03\x00"),
    ]


@pytest.mark.parametrize("pick", range(14))
@pytest.mark.parametrize("base", TWO_BASES)
def test_invalid_vr_values(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                           pick: int) -> None:
    # Prepare
    planted, data = bases[base]
    keyword, value = _bad_values(planted)[pick]
    span = spans(data)[int(Tag(keyword))]
    mutated = set_value(data, span, value, pad=b"\0" if span.vr == "UI" else b" ")
    # Execute / Assert
    run_case(capfd, f"{base}: {keyword} = {value!r}", mutated, planted, neighbours(bases, base))


LENGTH_TARGETS = ["PatientID", "StudyInstanceUID", "Rows", "Columns", "BitsAllocated",
                  "InstanceNumber", "RescaleSlope", "PixelData", "PatientName"]


@HOSTILE
@given(base=NATIVE, target=st.sampled_from(LENGTH_TARGETS),
       change=st.sampled_from(["+1", "-1", "+2", "-2", "zero", "huge", "undefined"]))
def test_wrong_lengths(capfd: pytest.CaptureFixture[str], bases: Bases, base: str, target: str,
                       change: str) -> None:
    # Prepare
    planted, data = bases[base]
    span = spans(data)[int(Tag(target))]
    new = {"zero": 0, "huge": 0xFFFFFFF0, "undefined": 0xFFFFFFFF}.get(change)
    length = span.length + int(change) if new is None else new
    mutated = set_length(data, span, max(length, 0))
    # Execute / Assert
    run_case(capfd, f"{base}: length of {target} {span.length} -> {change}", mutated, planted,
             neighbours(bases, base))


MUST_SKIP_WHEN_REMOVED = ["PatientID", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                          "Rows", "Columns", "BitsAllocated", "PhotometricInterpretation",
                          "PixelData"]
OTHER_REQUIRED = ["SamplesPerPixel", "BitsStored", "HighBit", "PixelRepresentation",
                  "SOPClassUID", "PatientIdentityRemoved"]


@pytest.mark.parametrize("keyword", MUST_SKIP_WHEN_REMOVED + OTHER_REQUIRED)
@pytest.mark.parametrize("base", TWO_BASES)
def test_removed_required_elements(capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
                                   keyword: str) -> None:
    # Prepare
    planted, data = bases[base]
    mutated = remove(data, spans(data)[int(Tag(keyword))])
    what = f"{base} without {keyword}"
    # Execute
    outcome = run_case(capfd, what, mutated, planted, neighbours(bases, base))
    # Assert
    if keyword in MUST_SKIP_WHEN_REMOVED or keyword == "PatientIdentityRemoved":
        assert_skipped(outcome, what)
    if keyword == "PatientIdentityRemoved":
        assert outcome.skip is not None and outcome.skip.code is SkipCode.PHI


@pytest.mark.parametrize("base", NATIVE_BASES)
def test_missing_transfer_syntax_is_not_dicom_but_no_crash(
        capfd: pytest.CaptureFixture[str], bases: Bases, base: str) -> None:
    # Prepare
    planted, data = bases[base]
    # Execute
    outcome = run_case(capfd, f"{base} without (0002,0010)", with_transfer_syntax(data, None),
                       planted, neighbours(bases, base))
    # Assert: no transfer syntax, no way to know the encoding of the pixels
    assert_skipped(outcome, f"{base} without (0002,0010)")
