"""labels.csv parsing: join keys, clear errors with safe reasons."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.data.labels import read_labels
from common.errors import DataError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_rows_any_column_order_and_blank_lines(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "label,patient_id,study_uid,note\n1,P1,1.2.3,x\n\n0, P2 ,1.2.4,\n")
    # Execute
    labels = read_labels(path)
    # Assert
    assert labels == {("P1", "1.2.3"): 1, ("P2", "1.2.4"): 0}


def test_missing_file_gives_no_labels(tmp_path: Path) -> None:
    # Execute / Assert
    assert read_labels(tmp_path / "labels.csv") == {}


def test_missing_column_names_it_in_safe_reason(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study\nP1,1.2.3\n")
    # Execute
    with pytest.raises(DataError) as info:
        read_labels(path)
    # Assert
    assert "study_uid" in info.value.safe_reason and "label" in info.value.safe_reason
    assert str(tmp_path) not in info.value.safe_reason


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("P1,1.2.3,1\nP2,1.2.4,yes\n", 3),
        ("P1,1.2.3,-1\n", 2),
        ("P1,1.2.3,0\nP1,1.2.3,1\n", 3),
        (",1.2.3,0\n", 2),
    ],
)
def test_bad_row_line_number_only_in_local_message(tmp_path: Path, body: str, line: int) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study_uid,label\n" + body)
    # Execute
    with pytest.raises(DataError) as info:
        read_labels(path)
    # Assert
    assert f"line {line}" in str(info.value)
    assert "line" not in info.value.safe_reason
    assert "P1" not in info.value.safe_reason and "1.2.3" not in info.value.safe_reason


def test_repeated_identical_row_is_accepted(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study_uid,label\nP1,1.2.3,1\nP1,1.2.3,1\n")
    # Execute / Assert
    assert read_labels(path) == {("P1", "1.2.3"): 1}
