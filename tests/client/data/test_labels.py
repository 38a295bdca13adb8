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


# --- parse_labels: every problem, one rule set with read_labels ---------------------------

import string  # noqa: E402

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from client.data.labels import LabelIssue, match_problems, parse_labels  # noqa: E402

HEADER = "patient_id,study_uid,label\n"
BAD_ROWS = (
    "QX1,9.8.7.1,1\n"        # line 2: fine
    "QX2,9.8.7.2,banana\n"   # line 3: non-integer
    ",9.8.7.3,0\n"           # line 4: empty patient_id
    "QX4,9.8.7.4,-3\n"       # line 5: negative
    "QX5,9.8.7.5,2\n"        # line 6: not binary (kept)
    "QX1,9.8.7.1,0\n"        # line 7: conflict with line 2
    "QX7,,\n"                # line 8: empty study_uid and empty label
)


def test_parse_reports_every_bad_row_with_its_line_and_code(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, HEADER + BAD_ROWS)
    # Execute
    table = parse_labels(path)
    # Assert
    got = [(p.line, p.code) for p in table.problems]
    assert got == [
        (3, LabelIssue.NOT_INTEGER),
        (4, LabelIssue.EMPTY_ID),
        (5, LabelIssue.NEGATIVE),
        (6, LabelIssue.NOT_BINARY),
        (7, LabelIssue.CONFLICT),
        (8, LabelIssue.EMPTY_ID),
        (8, LabelIssue.NOT_INTEGER),
    ]
    assert table.labels == {("QX5", "9.8.7.5"): 2}  # the conflicting study is left out
    assert "line 2" in next(p.text for p in table.problems if p.code is LabelIssue.CONFLICT)
    for problem in table.problems:
        for value in ("QX", "9.8.7", "banana", "-3", str(tmp_path)):
            assert value not in problem.text


def test_read_labels_raises_on_the_first_malformed_row_and_keeps_labels_above_one(
    tmp_path: Path,
) -> None:
    # Prepare
    bad = _write(tmp_path, HEADER + BAD_ROWS)
    (tmp_path / "ok").mkdir()
    ok = _write(tmp_path / "ok", HEADER + "QX1,9.8.7.1,2\n")
    # Execute
    with pytest.raises(DataError) as info:
        read_labels(bad)
    # Assert: same rule set as parse_labels; a label of 2 is the task's business, not the CSV's
    assert "line 3" in str(info.value) and "not an integer" in str(info.value)
    assert read_labels(ok) == {("QX1", "9.8.7.1"): 2}


def test_unreadable_file_is_one_problem_not_an_exception(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "labels.csv"
    path.write_bytes(b"patient_id,study_uid,label\n\xff\xfe\x00,1,1\n")
    # Execute
    table = parse_labels(path)
    # Assert
    assert [p.code for p in table.problems] == [LabelIssue.UNREADABLE]
    with pytest.raises(DataError):
        read_labels(path)


def test_oversized_field_is_reported_at_its_line(tmp_path: Path) -> None:
    # Prepare: csv's field size limit is 131072 characters
    path = _write(tmp_path, HEADER + "QX1,9.8.7.1,1\n" + "QX2,\"" + "9" * 200_000 + "\",1\n")
    # Execute
    table = parse_labels(path)
    # Assert
    assert [(p.line, p.code) for p in table.problems] == [(3, LabelIssue.BAD_CSV)]
    assert table.labels == {("QX1", "9.8.7.1"): 1}


def test_match_reports_rows_without_images_and_images_without_rows(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, HEADER + "QX1,9.8.7.1,1\nQX2,9.8.7.2,0\n")
    images = [("QX1", "9.8.7.1"), ("QX3", "9.8.7.3"), ("QX3", "9.8.7.3"), ("QX4", "9.8.7.4")]
    # Execute
    problems = match_problems(parse_labels(path), images)
    # Assert
    assert [(p.line, p.code) for p in problems] == [
        (3, LabelIssue.NO_IMAGE),
        (None, LabelIssue.UNLABELLED_IMAGES),
    ]
    assert "3 usable image(s) of 2 study(ies)" in problems[1].text


_IDS = st.text(alphabet=string.ascii_uppercase, min_size=4, max_size=8).map(lambda s: "Z" + s)
_CELL = st.one_of(_IDS, st.sampled_from(["", "0", "1", "2", "-1", "x", " ", '"', "1.5"]))


@settings(max_examples=60, deadline=None)
@given(
    header=st.permutations(["patient_id", "study_uid", "label", "note"]),
    rows=st.lists(st.lists(_CELL, min_size=0, max_size=5), max_size=12),
)
def test_parse_never_raises_and_never_echoes_a_cell(
    tmp_path_factory: pytest.TempPathFactory, header: list[str], rows: list[list[str]]
) -> None:
    # Prepare
    folder = tmp_path_factory.mktemp("fuzz")
    body = "\n".join(",".join(cells) for cells in rows)
    path = _write(folder, ",".join(header) + "\n" + body + "\n")
    ids = {cell for cells in rows for cell in cells if cell.startswith("Z")}
    # Execute
    table = parse_labels(path)
    # Assert
    for problem in table.problems:
        assert problem.line is None or problem.line >= 1
        assert not any(value in problem.message() for value in ids)
    if not table.malformed:
        assert read_labels(path) == table.labels
    else:
        with pytest.raises(DataError):
            read_labels(path)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=300))
def test_parse_survives_arbitrary_text(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    # Prepare
    path = _write(tmp_path_factory.mktemp("any"), text)
    # Execute
    table = parse_labels(path)
    # Assert: either labels or problems explain the file; nothing raised
    assert all(isinstance(p.code, LabelIssue) for p in table.problems)
    assert table.exists


# --- parse_targets: one column per target kind, the task's rules, the same row machinery ---

from client.data.labels import (  # noqa: E402
    TARGET_COLUMNS,
    parse_targets,
    read_targets,
)
from common.errors import ConfigError  # noqa: E402
from common.tasks import list_tasks  # noqa: E402


def test_every_registered_task_has_a_column_or_needs_none() -> None:
    # Prepare
    names = {task.info.name for task in list_tasks()}
    # Execute
    without = names - set(TARGET_COLUMNS)
    # Assert: only the mask and self-supervised tasks read no column
    assert without == {"segmentation", "reconstruction"}
    assert set(TARGET_COLUMNS) <= names


@pytest.mark.parametrize(
    ("task", "k", "body", "expected", "problems"),
    [
        ("multiclass", 3, "QX1,9.1,0\nQX2,9.2,2\nQX3,9.3,3\nQX4,9.4,x\n",
         {("QX1", "9.1"): 0, ("QX2", "9.2"): 2, ("QX3", "9.3"): 3},
         [(4, LabelIssue.CLASS_OUT_OF_RANGE), (5, LabelIssue.NOT_INTEGER)]),
        ("ordinal", 5, "QX1,9.1,4\nQX2,9.2,-1\nQX1,9.1,3\n", {},
         [(3, LabelIssue.NEGATIVE), (4, LabelIssue.CONFLICT)]),
        ("binary", None, "QX1,9.1,1\nQX2,9.2,2\n", {("QX1", "9.1"): 1, ("QX2", "9.2"): 2},
         [(3, LabelIssue.NOT_BINARY)]),
    ],
)
def test_label_column_follows_the_task(tmp_path: Path, task: str, k: int | None, body: str,
                                       expected: dict[tuple[str, str], int],
                                       problems: list[tuple[int, LabelIssue]]) -> None:
    # Prepare
    path = _write(tmp_path, HEADER + body)
    # Execute
    table = parse_targets(path, task, k)
    # Assert
    assert table.column == "label" and table.targets == expected
    assert [(p.line, p.code) for p in table.problems] == problems
    assert table.malformed == table.problems  # every problem makes the task refuse the CSV


def test_findings_are_sets_of_indices_and_bad_lists_are_named_by_line(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study_uid,findings\n"
                  "QX1,9.1,\n"          # 2: no finding
                  "QX2,9.2,2; 0\n"      # 3: findings 0 and 2
                  "QX3,9.3,0;;1\n"      # 4: empty item
                  "QX4,9.4,1;1\n"       # 5: repeated
                  "QX5,9.5,0;3\n"       # 6: finding 3 >= K
                  "QX6,9.6,pneumo\n"    # 7: not numbers
                  "QX2,9.2,0;2\n")      # 8: the same set as line 3, in another order
    # Execute
    table = parse_targets(path, "multilabel", 3)
    # Assert
    assert table.targets == {("QX1", "9.1"): (), ("QX2", "9.2"): (0, 2), ("QX5", "9.5"): (0, 3)}
    assert [(p.line, p.code) for p in table.problems] == [
        (4, LabelIssue.BAD_FINDINGS), (5, LabelIssue.BAD_FINDINGS),
        (6, LabelIssue.FINDING_OUT_OF_RANGE), (7, LabelIssue.BAD_FINDINGS)]
    assert all("pneumo" not in p.text and "QX" not in p.text for p in table.problems)


def test_values_must_be_finite_decimal_numbers(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study_uid,value\n"
                  "QX1,9.1,12.5\nQX2,9.2,-3e-2\nQX3,9.3,nan\nQX4,9.4,Inf\nQX5,9.5,1e999\n"
                  "QX6,9.6,12 mm\nQX7,9.7,1_0\nQX8,9.8,\nQX1,9.1,12.6\n")
    # Execute
    table = parse_targets(path, "regression")
    # Assert
    assert table.targets == {("QX2", "9.2"): -0.03}
    assert [(p.line, p.code) for p in table.problems] == [
        (4, LabelIssue.NOT_FINITE), (5, LabelIssue.NOT_FINITE), (6, LabelIssue.NOT_FINITE),
        (7, LabelIssue.NOT_NUMBER), (8, LabelIssue.NOT_NUMBER), (9, LabelIssue.NOT_NUMBER),
        (10, LabelIssue.CONFLICT)]
    assert table.num_classes is None


def test_missing_task_column_is_named_and_no_column_tasks_read_nothing(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, HEADER + "QX1,9.1,1\n")
    # Execute
    regression = parse_targets(path, "regression")
    segmentation = parse_targets(path, "segmentation")
    # Assert
    assert [(p.line, p.code) for p in regression.problems] == [(1, LabelIssue.MISSING_COLUMN)]
    assert "value" in regression.problems[0].text
    assert segmentation.column is None and segmentation.targets == {} and segmentation.exists


def test_unknown_k_is_fitted_and_bad_k_or_task_is_refused(tmp_path: Path) -> None:
    # Prepare
    path = _write(tmp_path, "patient_id,study_uid,findings\nQX1,9.1,0;4\nQX2,9.2,\n")
    # Execute
    table = parse_targets(path, "multilabel")
    # Assert
    assert table.num_classes == 5 and table.problems == ()
    with pytest.raises(DataError):
        parse_targets(path, "multilabel", 1)
    with pytest.raises(ConfigError):
        parse_targets(path, "no-such-task")


def test_read_targets_raises_on_the_first_problem_with_a_safe_reason(tmp_path: Path) -> None:
    # Prepare
    bad = _write(tmp_path, "patient_id,study_uid,value\nQX1,9.1,1.5\nQX2,9.2,nan\n")
    # Execute
    with pytest.raises(DataError) as info:
        read_targets(bad, "regression")
    # Assert
    assert "line 3" in str(info.value)
    assert info.value.safe_reason == "the labels CSV is malformed: a NaN or infinite value"
    assert read_targets(tmp_path / "none.csv", "regression") == {}


@settings(max_examples=40, deadline=None)
@given(task=st.sampled_from(["multiclass", "ordinal", "multilabel", "regression"]),
       rows=st.lists(st.lists(_CELL, min_size=0, max_size=4), max_size=10))
def test_parse_targets_never_raises_on_data_and_never_echoes_a_cell(
    tmp_path_factory: pytest.TempPathFactory, task: str, rows: list[list[str]]
) -> None:
    # Prepare
    folder = tmp_path_factory.mktemp("fuzz-targets")
    header = f"patient_id,study_uid,{TARGET_COLUMNS[task]}"
    path = _write(folder, header + "\n" + "\n".join(",".join(c) for c in rows) + "\n")
    ids = {cell for cells in rows for cell in cells if cell.startswith("Z")}
    # Execute
    table = parse_targets(path, task, 3)
    # Assert
    for problem in table.problems:
        assert problem.line is not None and problem.line >= 2
        assert not any(value in problem.message() for value in ids)
    assert set(table.targets) <= set(table.lines)
