"""Hostile labels CSVs beside three clean, labelled DICOM files.

Requirements: ``vesalius node check`` never crashes on a labels CSV; a bad CSV makes it exit
non-zero with a reason per bad row (its line number); no patient id, study UID, label text or
path from the CSV is printed, logged or warned about.
"""

from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import Result
from hypothesis import given
from hypothesis import strategies as st

from tests.hostile._mutate import Planted, write_files
from tests.hostile._observe import assert_clean_exit, assert_no_leak, invoke, observe, outputs
from tests.hostile.conftest import HOSTILE, Bases

FILES = ("CT_small.dcm", "MR_small.dcm", "rtdose_1frame.dcm")
HEADER = "patient_id,study_uid,label"
LABEL_TOKEN = "LBL-3e9a0c77d1"
UNKNOWN_PID = "PID-0badc0ffee"
HUGE_TOKEN = "HUGE-6c1f0e9b27"


@dataclass(frozen=True)
class Checked:
    """The two runs of ``node check`` (json, table) on one labels CSV."""

    json: Result
    table: Result


def _rows(bases: Bases) -> list[Planted]:
    return [bases[name][0] for name in FILES]


def _row(p: Planted, label: object = None) -> str:
    return f"{p.patient_id},{p.study_uid},{p.label if label is None else label}"


def check_labels(capfd: pytest.CaptureFixture[str], bases: Bases, what: str, csv: bytes,
                 secrets: list[str] | tuple[str, ...] = ()) -> Checked:
    """Run ``node check`` (json and table) on the three files with ``csv`` as labels.csv."""
    capfd.readouterr()
    results: dict[str, Result] = {}
    texts: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hostile-labels-") as tmp:
        folder = Path(tmp) / "data"
        write_files(folder, [bases[name][1] for name in FILES])
        (folder / "labels.csv").write_bytes(csv)
        for mode in ("json", "table"):
            with observe() as obs:
                result = invoke(["node", "check", "--data", str(folder), "--format", mode])
            assert_clean_exit(result, f"{what}: node check --format {mode}")
            results[mode] = result
            texts[f"{mode} output"] = outputs(result)
            texts[f"{mode} warnings"] = "\n".join(obs.warnings)
            texts[f"{mode} logs"] = "\n".join(obs.logs)
        fd = capfd.readouterr()
        texts["real stdout"], texts["real stderr"] = fd.out, fd.err
        planted = [v for p in _rows(bases) for v in p.values()]
        assert_no_leak(texts, [*planted, *secrets, str(folder), str(folder / "labels.csv"),
                               Path(tmp).name])
    return Checked(json=results["json"], table=results["table"])


def names_line(text: str, line: int) -> bool:
    """``text`` names CSV line ``line``: "line 3", a JSON ``"line": 3`` or a table cell ``│ 3 │``."""
    patterns = (rf"\b(line|row)\W*{line}\b", rf'"line":\s*{line}\b', rf"[│┃|]\s*{line}\s*[│┃|]")
    return any(re.search(p, text, re.IGNORECASE) for p in patterns)


def _assert_reported(checked: Checked, what: str, line: int | None, *, refuse: bool) -> None:
    for mode, result in (("json", checked.json), ("table", checked.table)):
        if refuse:
            assert result.exit_code != 0, (
                f"{what}: node check --format {mode} exited 0 on a bad CSV")
        if line is not None:
            assert names_line(outputs(result), line), (
                f"{what}: --format {mode} names no reason for line {line}:\n"
                f"{outputs(result)[:1200]}")


def _good(bases: Bases, *, bom: bool = False, extra: str = "") -> bytes:
    text = "\n".join([HEADER, *(_row(p) for p in _rows(bases))]) + "\n" + extra
    return ("\ufeff" if bom else "").encode() + text.encode()


def test_valid_csv_passes(capfd: pytest.CaptureFixture[str], bases: Bases) -> None:
    # Prepare / Execute
    checked = check_labels(capfd, bases, "valid CSV", _good(bases))
    # Assert: the control case is accepted, all three images labelled
    assert checked.json.exit_code == 0, outputs(checked.json)
    assert json.loads(checked.json.stdout)["labelled_images"] == 3


@pytest.mark.parametrize("variant", ["bom", "blank-lines", "extra-column", "crlf"])
def test_harmless_variants_pass(capfd: pytest.CaptureFixture[str], bases: Bases,
                                variant: str) -> None:
    # Prepare
    rows = [_row(p) for p in _rows(bases)]
    csv = {
        "bom": _good(bases, bom=True),
        "blank-lines": ("\n".join([HEADER, "", rows[0], "", *rows[1:]]) + "\n\n").encode(),
        "extra-column": ("\n".join([HEADER + ",note", *(r + ",x" for r in rows)]) + "\n").encode(),
        "crlf": ("\r\n".join([HEADER, *rows]) + "\r\n").encode(),
    }[variant]
    # Execute
    checked = check_labels(capfd, bases, variant, csv)
    # Assert
    assert checked.json.exit_code == 0, outputs(checked.json)
    assert json.loads(checked.json.stdout)["labelled_images"] == 3


def _bad_cases(bases: Bases) -> list[tuple[str, bytes, int | None, list[str]]]:
    """(name, csv bytes, line that must be named or None, extra secrets)."""
    p1, p2, p3 = _rows(bases)
    rows = [_row(p) for p in (p1, p2, p3)]

    def csv(lines: list[str]) -> bytes:
        return ("\n".join(lines) + "\n").encode()

    return [
        ("missing-label-column", csv(["patient_id,study_uid",
                                       *(f"{p.patient_id},{p.study_uid}" for p in (p1, p2, p3))]),
         None, []),
        ("renamed-column", csv(["patientid,study_uid,label", *rows]), None, []),
        ("conflicting-duplicate", csv([HEADER, *rows, _row(p1, 1 - p1.label)]), 5, []),
        ("non-integer-1.5", csv([HEADER, rows[0], _row(p2, "1.5"), rows[2]]), 3, []),
        ("non-integer-token", csv([HEADER, rows[0], rows[1], _row(p3, LABEL_TOKEN)]), 4,
         [LABEL_TOKEN]),
        ("empty-label", csv([HEADER, _row(p1, ""), *rows[1:]]), 2, []),
        ("negative", csv([HEADER, _row(p1, -1), *rows[1:]]), 2, []),
        ("out-of-range-2", csv([HEADER, rows[0], _row(p2, 2), rows[2]]), 3, []),
        ("out-of-range-huge", csv([HEADER, rows[0], rows[1], _row(p3, 10**20)]), 4, []),
        ("underscore-int", csv([HEADER, rows[0], rows[1], _row(p3, "1_0")]), 4, []),
        ("semicolon-delimiter", csv([HEADER.replace(",", ";"), *(r.replace(",", ";") for r in rows)]),
         None, []),
        ("tab-delimiter", csv([HEADER.replace(",", "\t"), *(r.replace(",", "\t") for r in rows)]),
         None, []),
        ("utf16", ("\n".join([HEADER, *rows]) + "\n").encode("utf-16"), None, []),
        ("binary-junk", bytes(range(256)) * 8, None, []),
        ("unclosed-quote", csv([HEADER, rows[0], '"' + rows[1], rows[2]]), None, []),
        ("huge-field", csv([HEADER, *rows, f"{HUGE_TOKEN}{'x' * 300_000},1.2.3,1"]), 5,
         [HUGE_TOKEN]),
        ("empty-patient-id", csv([HEADER, f",{p1.study_uid},0", *rows[1:]]), 2, []),
    ]


BAD_NAMES = ["missing-label-column", "renamed-column", "conflicting-duplicate", "non-integer-1.5",
             "non-integer-token", "empty-label", "negative", "out-of-range-2",
             "out-of-range-huge", "underscore-int", "semicolon-delimiter", "tab-delimiter",
             "utf16", "binary-junk", "unclosed-quote", "huge-field", "empty-patient-id"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_csv_is_refused_per_row_without_ids(capfd: pytest.CaptureFixture[str], bases: Bases,
                                                name: str) -> None:
    # Prepare
    cases = {case[0]: case for case in _bad_cases(bases)}
    _, csv, line, secrets = cases[name]
    # Execute
    checked = check_labels(capfd, bases, name, csv, secrets)
    # Assert
    _assert_reported(checked, name, line, refuse=True)


@pytest.mark.parametrize("name", ["unknown-patient", "nul-in-study-uid"])
def test_rows_without_images_are_flagged_per_row_without_ids(
        capfd: pytest.CaptureFixture[str], bases: Bases, name: str) -> None:
    # Prepare: rows that parse but match no usable image (a warning, not necessarily a refusal)
    p1, p2, p3 = _rows(bases)
    rows = [_row(p) for p in (p1, p2, p3)]
    extra = {"unknown-patient": f"{UNKNOWN_PID},1.2.826.0.1.3680043.8.498.1,1",
             "nul-in-study-uid": f"{p3.patient_id},\0{p3.study_uid},{p3.label}"}[name]
    csv = ("\n".join([HEADER, rows[0], rows[1], extra]) + "\n").encode()
    # Execute
    checked = check_labels(capfd, bases, name, csv, [UNKNOWN_PID])
    # Assert: the row is named by its line in both modes
    _assert_reported(checked, name, 4, refuse=False)


@HOSTILE
@given(line=st.integers(0, 3), field=st.integers(0, 2),
       junk=st.one_of(st.text(max_size=40), st.binary(max_size=40).map(lambda b: b.decode("latin-1"))))
def test_random_field_replacement_never_crashes_or_leaks(
        capfd: pytest.CaptureFixture[str], bases: Bases, line: int, field: int, junk: str) -> None:
    # Prepare: one field of one line (header included) replaced by arbitrary text
    lines = [HEADER, *(_row(p) for p in _rows(bases))]
    cells = lines[line].split(",")
    cells[field] = junk
    lines[line] = ",".join(cells)
    csv = ("\n".join(lines) + "\n").encode("utf-8", "surrogateescape")
    # Execute
    checked = check_labels(capfd, bases, f"line {line + 1} field {field} = {junk!r}", csv)
    # Assert: an accepted CSV still gives a well-formed report
    if checked.json.exit_code == 0:
        doc = json.loads(checked.json.stdout)
        assert doc["files_seen"] == doc["files_used"] + len(doc["skipped"])
