"""PHI planted in free text or a real-looking name, and headers announcing huge images.

By default a file with identifying free text or a Patient's Name that is not the pseudonym
must be refused as ``phi`` with a sentence naming the attribute by tag, and the value must
not be printed anywhere. A header announcing a huge image must be skipped quickly, without
allocating it.
"""

from __future__ import annotations

import io
import time

import pydicom
import pytest

from client.dicom.reasons import SkipCode
from tests.hostile._case import assert_skipped, neighbours, run_case
from tests.hostile._mutate import Planted
from tests.hostile.conftest import Bases

BASES = ("CT_small.dcm", "MR_small_implicit.dcm")


def _edit(data: bytes, **attrs: object) -> bytes:
    """Re-encode ``data`` with top-level attributes set (same transfer syntax)."""
    ds = pydicom.dcmread(io.BytesIO(data))
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


PHI_CASES = [
    ("PatientName", "Doe^Jane", "(0010,0010)", ["Doe^Jane"]),
    ("PatientComments", "Jane Doe born 1961-03-02 MRN-55fa0c31e9", "(0010,4000)",
     ["MRN-55fa0c31e9", "1961-03-02"]),
    ("ImageComments", "pt Jane Doe tel 555-0143 NOTE-8d1e07b2c4", "(0020,4000)",
     ["NOTE-8d1e07b2c4", "555-0143"]),
]


@pytest.mark.parametrize(("keyword", "value", "tag", "secrets"), PHI_CASES,
                         ids=[c[0] for c in PHI_CASES])
@pytest.mark.parametrize("base", BASES)
def test_identifying_text_is_refused_naming_the_tag(
        capfd: pytest.CaptureFixture[str], bases: Bases, base: str, keyword: str, value: str,
        tag: str, secrets: list[str]) -> None:
    # Prepare
    planted, data = bases[base]
    mutated = _edit(data, **{keyword: value})
    what = f"{base}: {keyword} = {value!r}"
    # Execute
    outcome = run_case(capfd, what, mutated, planted, neighbours(bases, base),
                       secrets=[*secrets, value])
    # Assert
    skip = assert_skipped(outcome, what, SkipCode.PHI)
    assert tag in skip.text, f"{what}: the reason does not name {tag}: {skip.text!r}"


@pytest.mark.parametrize("keyword", ["PatientName", "PatientComments", "ImageComments"])
def test_identifying_text_is_never_printed_when_identified_files_are_allowed(
        capfd: pytest.CaptureFixture[str], bases: Bases, keyword: str) -> None:
    # Prepare
    planted, data = bases["CT_small.dcm"]
    value = "Doe^Jane" if keyword == "PatientName" else "Jane Doe MRN-0c7d44e1a9"
    mutated = _edit(data, **{keyword: value})
    # Execute / Assert (run_case searches every output for the value)
    run_case(capfd, f"--allow-identified, {keyword} = {value!r}", mutated, planted,
             neighbours(bases, "CT_small.dcm"), secrets=[value, "Doe^Jane", "MRN-0c7d44e1a9"],
             require_deidentified=False)


GEOMETRY = [
    {"Rows": 65535, "Columns": 65535},
    {"Rows": 65535, "Columns": 65535, "BitsAllocated": 32, "BitsStored": 32, "HighBit": 31},
    {"NumberOfFrames": "2147483647"},
    {"NumberOfFrames": "-1"},
    {"NumberOfFrames": "0"},
    {"Rows": 0},
    {"Columns": 0},
    {"BitsAllocated": 64, "BitsStored": 64, "HighBit": 63},
    {"BitsStored": 17},
    {"HighBit": 40},
]


@pytest.mark.parametrize("attrs", GEOMETRY, ids=[str(g) for g in GEOMETRY])
@pytest.mark.parametrize("base", BASES)
def test_impossible_geometry_is_skipped_quickly(
        capfd: pytest.CaptureFixture[str], bases: Bases, base: str,
        attrs: dict[str, object]) -> None:
    # Prepare
    planted, data = bases[base]
    mutated = _edit(data, **attrs)
    what = f"{base} with {attrs}"
    # Execute
    start = time.perf_counter()
    outcome = run_case(capfd, what, mutated, planted, neighbours(bases, base))
    elapsed = time.perf_counter() - start
    # Assert: never used, and no attempt to allocate the announced image
    assert_skipped(outcome, what)
    assert elapsed < 10, f"{what}: took {elapsed:.1f} s"


def test_planted_values_are_distinct(bases: Bases) -> None:
    # Prepare / Execute
    values = [v for planted, _ in bases.values() for v in planted.values()]
    # Assert: every planted value is unique, so a hit names exactly one file's attribute
    assert len(values) == len(set(values))
    assert all(isinstance(p, Planted) for p, _ in bases.values())
