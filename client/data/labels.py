"""Study-level labels from ``<data_dir>/labels.csv``: one set of rules for training and checks.

Format: a UTF-8 CSV with the header ``patient_id,study_uid`` plus the target column of the
task (extra columns are ignored, column order is free) and one row per study.
``patient_id`` matches (0010,0020) Patient ID and ``study_uid`` matches (0020,000D) Study
Instance UID. Blank lines are ignored. A missing file means "no labels": every image is then
unlabelled (the node check still works, training refuses). The target columns, one per
:class:`common.tasks.TargetKind` that needs one (:data:`TARGET_COLUMNS`):

``label``
    An integer >= 0: the class (``binary``: 0 or 1; ``multiclass``: 0 .. K-1) or the
    grade (``ordinal``: 0 .. K-1).
``findings``
    ``multilabel``: the study's finding indices (0 .. K-1) separated by ``;``, e.g. ``0;2``;
    an empty cell means "no finding".
``value``
    ``regression``: a finite real number in decimal notation (``12.5``, ``-3``, ``1e-2``).

``segmentation`` needs no column (its targets are mask DICOM files beside the images) and
``reconstruction`` needs no labels at all (the target is the image itself).

:func:`parse_labels` validates the ``label`` column as the binary path always has: it never
raises and returns every problem it finds, each with the CSV line number, a stable code and
one sentence saying what to fix. :func:`read_labels` (what binary training uses) raises
:class:`common.errors.DataError` on the first *malformed* row. :func:`parse_targets` applies
the same row machinery to any task's column with the task's rules (class or grade below K,
well-formed findings below K, finite values) and :func:`read_targets` raises on its first
problem; :func:`match_problems` adds the problems that need the scanned images (a row without
a usable image, images without a row).

Privacy: no problem sentence contains a patient id, a study UID, a label text or a path;
only line numbers and column names. The local message of a :class:`DataError` names the
line number; its ``safe_reason`` (which may leave the node) names neither line nor value.
"""

from __future__ import annotations

import csv
import logging
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from common.errors import DataError

logger = logging.getLogger(__name__)

LABELS_FILENAME = "labels.csv"
REQUIRED_COLUMNS = ("patient_id", "study_uid", "label")
#: The labels the (binary) classification task can train on today.
BINARY_LABELS = frozenset({0, 1})
#: The target column of each task that reads one (segmentation and reconstruction read none).
TARGET_COLUMNS: dict[str, str] = {
    "binary": "label",
    "multiclass": "label",
    "ordinal": "label",
    "multilabel": "findings",
    "regression": "value",
}
#: Separator of the finding indices in a ``findings`` cell.
FINDINGS_SEPARATOR = ";"

#: (patient_id, study_uid) -> label
LabelMap = Mapping[tuple[str, str], int]
StudyKey = tuple[str, str]
#: One study's target: a class or grade (``int``), finding indices (``tuple``) or a value.
Target = int | tuple[int, ...] | float
_T = TypeVar("_T", int, float, tuple[int, ...])


class LabelIssue(str, Enum):
    """Stable codes of labels-CSV problems (safe to count and to show)."""

    MISSING_FILE = "missing-file"
    UNREADABLE = "unreadable"
    MISSING_COLUMN = "missing-column"
    BAD_CSV = "bad-csv"
    EMPTY_ID = "empty-id"
    NOT_INTEGER = "non-integer-label"
    NEGATIVE = "negative-label"
    NOT_BINARY = "non-binary-label"
    CLASS_OUT_OF_RANGE = "class-out-of-range"
    BAD_FINDINGS = "bad-findings"
    FINDING_OUT_OF_RANGE = "finding-out-of-range"
    NOT_NUMBER = "non-numeric-value"
    NOT_FINITE = "non-finite-value"
    CONFLICT = "conflicting-labels"
    NO_IMAGE = "no-usable-image"
    UNLABELLED_IMAGES = "unlabelled-images"


#: Problems that make the CSV unreadable for training (:func:`read_labels` raises on them).
MALFORMED = frozenset({
    LabelIssue.UNREADABLE,
    LabelIssue.MISSING_COLUMN,
    LabelIssue.BAD_CSV,
    LabelIssue.EMPTY_ID,
    LabelIssue.NOT_INTEGER,
    LabelIssue.NEGATIVE,
    LabelIssue.CONFLICT,
    LabelIssue.CLASS_OUT_OF_RANGE,
    LabelIssue.BAD_FINDINGS,
    LabelIssue.FINDING_OUT_OF_RANGE,
    LabelIssue.NOT_NUMBER,
    LabelIssue.NOT_FINITE,
})

#: Short reasons that may leave the node (no line number, no value).
_SAFE: dict[LabelIssue, str] = {
    LabelIssue.UNREADABLE: "unreadable or not UTF-8",
    LabelIssue.BAD_CSV: "not parseable as CSV",
    LabelIssue.EMPTY_ID: "empty id",
    LabelIssue.NOT_INTEGER: "non-integer label",
    LabelIssue.NEGATIVE: "negative label",
    LabelIssue.CONFLICT: "conflicting labels for one study",
    LabelIssue.CLASS_OUT_OF_RANGE: "a class or grade outside 0..K-1",
    LabelIssue.BAD_FINDINGS: "a malformed findings list",
    LabelIssue.FINDING_OUT_OF_RANGE: "a finding outside 0..K-1",
    LabelIssue.NOT_NUMBER: "a non-numeric value",
    LabelIssue.NOT_FINITE: "a NaN or infinite value",
}


@dataclass(frozen=True)
class LabelProblem:
    """One problem of the labels CSV.

    Attributes
    ----------
    code : LabelIssue
        Stable code.
    text : str
        One sentence: what is wrong and how to fix it (no value, id or path).
    line : int | None
        1-based CSV line (the header is line 1); ``None`` for whole-file problems.
    safe : str
        Short reason without line number, for a ``safe_reason``.
    """

    code: LabelIssue
    text: str
    line: int | None = None
    safe: str = ""

    @property
    def malformed(self) -> bool:
        """Whether training refuses the whole CSV because of this problem."""
        return self.code in MALFORMED

    def message(self) -> str:
        """The sentence, prefixed with its line number when it has one."""
        return f"line {self.line}: {self.text}" if self.line is not None else self.text

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready ``{"line", "code", "reason"}``."""
        return {"line": self.line, "code": self.code.value, "reason": self.text}


@dataclass(frozen=True)
class LabelTable:
    """The outcome of :func:`parse_labels`.

    Attributes
    ----------
    labels : dict[tuple[str, str], int]
        Valid rows: ``(patient_id, study_uid) -> label``; a study listed with two different
        labels is left out.
    lines : dict[tuple[str, str], int]
        First CSV line of each key of ``labels``.
    problems : tuple[LabelProblem, ...]
        Every problem found, in line order.
    exists : bool
        Whether the file exists.
    """

    labels: dict[StudyKey, int] = field(default_factory=dict)
    lines: dict[StudyKey, int] = field(default_factory=dict)
    problems: tuple[LabelProblem, ...] = ()
    exists: bool = True

    @property
    def malformed(self) -> tuple[LabelProblem, ...]:
        """The problems that make training refuse the CSV."""
        return tuple(p for p in self.problems if p.malformed)


@dataclass(frozen=True)
class TargetTable:
    """The outcome of :func:`parse_targets`: one task's targets from the labels CSV.

    Attributes
    ----------
    task : str
        The task's registry name.
    column : str | None
        The column read (:data:`TARGET_COLUMNS`); ``None`` for a task that reads none.
    num_classes : int | None
        K used for the range checks: the caller's, 2 for binary, or (when the caller gave
        none) the smallest K that fits the valid rows; ``None`` for regression.
    targets : dict[tuple[str, str], Target]
        Valid rows: an ``int`` class or grade, a sorted ``tuple`` of finding indices, or a
        ``float`` value. A row with a problem, or a study listed with two different targets,
        is left out.
    lines : dict[tuple[str, str], int]
        First CSV line of each key of ``targets``.
    problems : tuple[LabelProblem, ...]
        Every problem found, in line order; each one makes the task refuse the CSV.
    exists : bool
        Whether the file exists.
    """

    task: str
    column: str | None
    num_classes: int | None = None
    targets: dict[StudyKey, Target] = field(default_factory=dict)
    lines: dict[StudyKey, int] = field(default_factory=dict)
    problems: tuple[LabelProblem, ...] = ()
    exists: bool = True

    @property
    def labels(self) -> dict[StudyKey, Target]:
        """The valid targets (the name :func:`match_problems` reads)."""
        return self.targets

    @property
    def malformed(self) -> tuple[LabelProblem, ...]:
        """The problems that make the task refuse the CSV (all of them)."""
        return self.problems


def _problem(code: LabelIssue, text: str, line: int | None = None) -> LabelProblem:
    return LabelProblem(code=code, text=text, line=line, safe=_SAFE.get(code, code.value))


def _header_problem(header: list[str], required: tuple[str, ...]) -> LabelProblem | None:
    missing = [c for c in required if c not in header]
    if not missing:
        return None
    return LabelProblem(
        code=LabelIssue.MISSING_COLUMN,
        text=f"the header lacks the column(s) {', '.join(missing)}; the first line must "
        f"name the columns {', '.join(required)}",
        line=1,
        safe="missing column(s) " + ", ".join(missing),
    )


#: ``cell(raw, line) -> (target, problem)``: parses one target cell (``raw`` is stripped).
CellParser = Callable[[str, int], tuple[_T | None, LabelProblem | None]]
#: ``check(target, line) -> problem``: a rule on a parsed, de-duplicated target.
TargetCheck = Callable[[_T, int], LabelProblem | None]


def _integer_cell(hint: str) -> CellParser[int]:
    """A parser of an integer >= 0 whose problems end with ``hint`` (what to write)."""

    def parse(raw: str, line: int) -> tuple[int | None, LabelProblem | None]:
        if not raw:
            return None, _problem(LabelIssue.NOT_INTEGER, f"the label is empty; {hint}", line)
        try:
            label = int(raw)
        except ValueError:
            return None, _problem(LabelIssue.NOT_INTEGER,
                                  f"the label is not an integer; {hint}", line)
        if label < 0:
            return None, _problem(LabelIssue.NEGATIVE, f"the label is negative; {hint}", line)
        return label, None

    return parse


def _label_problem(raw: str, line: int) -> tuple[int | None, LabelProblem | None]:
    """Parse one binary label cell: ``(label, None)``, or ``(None, problem)`` when malformed."""
    return _integer_cell("write 0 or 1")(raw, line)


def _empty_id(pid: str, study: str, line: int) -> LabelProblem | None:
    empty = [name for name, value in (("patient_id", pid), ("study_uid", study)) if not value]
    if not empty:
        return None
    return _problem(
        LabelIssue.EMPTY_ID,
        f"{' and '.join(empty)} {'is' if len(empty) == 1 else 'are'} empty; fill in the "
        "study's (0010,0020) Patient ID and (0020,000D) Study Instance UID, or delete the row",
        line,
    )


@dataclass(frozen=True)
class _Rows(Generic[_T]):
    """What :func:`_read_rows` found: valid targets, their lines, problems, file presence."""

    targets: dict[StudyKey, _T] = field(default_factory=dict)
    lines: dict[StudyKey, int] = field(default_factory=dict)
    problems: tuple[LabelProblem, ...] = ()
    exists: bool = True


def _read_rows(path: str | Path, column: str, cell: CellParser[_T], check: TargetCheck[_T],
               *, what: str) -> _Rows[_T]:
    """The single row machinery: read ``column`` of every row with ``cell``; never raises.

    A study listed twice with the same target is kept once; with different targets it is
    left out and each later row reported (``conflicting-labels``). ``check`` runs once per
    kept study, at its first line. ``what`` names the target in the conflict sentence.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        return _Rows(exists=False)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return _Rows(problems=(_problem(
            LabelIssue.UNREADABLE, "labels.csv cannot be read as UTF-8 text; save it as a "
            "UTF-8 CSV file readable by the node's user"),))
    reader = csv.DictReader(text.splitlines())
    try:
        header = [(h or "").strip() for h in (reader.fieldnames or [])]
    except csv.Error:
        header = []
    missing = _header_problem(header, ("patient_id", "study_uid", column))
    if missing is not None:
        return _Rows(problems=(missing,))
    reader.fieldnames = header
    targets: dict[StudyKey, _T] = {}
    lines: dict[StudyKey, int] = {}
    conflicted: set[StudyKey] = set()
    problems: list[LabelProblem] = []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error:
            problems.append(_problem(
                LabelIssue.BAD_CSV, "this line cannot be parsed as CSV (an unclosed quote or "
                "an oversized field); fix it, the rest of the file was not read",
                reader.reader.line_num))  # DictReader's own count lags on an error
            break
        line = reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        pid = (row.get("patient_id") or "").strip()
        study = (row.get("study_uid") or "").strip()
        target, bad_target = cell((row.get(column) or "").strip(), line)
        row_problems = [p for p in (_empty_id(pid, study, line), bad_target) if p is not None]
        if row_problems or target is None:
            problems.extend(row_problems)
            continue
        key = (pid, study)
        if key in lines:
            if targets.get(key, target) != target or key in conflicted:
                problems.append(_problem(
                    LabelIssue.CONFLICT, f"the same study is listed on line {lines[key]} with a "
                    f"different {what}; keep one row per study, with the right {what}", line))
                conflicted.add(key)
                targets.pop(key, None)
            continue
        rule = check(target, line)
        if rule is not None:
            problems.append(rule)
        targets[key] = target
        lines[key] = line
    return _Rows(targets=targets, lines=lines, problems=tuple(problems))


def _binary_check(label: int, line: int) -> LabelProblem | None:
    if label in BINARY_LABELS:
        return None
    return _problem(LabelIssue.NOT_BINARY, "the label is neither 0 nor 1, so the binary task "
                    "cannot use it; write 0 or 1", line)


def parse_labels(path: str | Path) -> LabelTable:
    """Validate a labels CSV and return its valid rows and EVERY problem; never raises.

    Parameters
    ----------
    path : str | Path
        The CSV file. A missing file yields an empty table with ``exists=False``.

    Returns
    -------
    LabelTable
        Valid labels, their line numbers and the problems in line order. A label outside
        :data:`BINARY_LABELS` is kept in ``labels`` but reported (``non-binary-label``).
    """
    rows = _read_rows(path, "label", _label_problem, _binary_check, what="label")
    return LabelTable(labels=rows.targets, lines=rows.lines, problems=rows.problems,
                      exists=rows.exists)


_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_NON_FINITE = frozenset({"nan", "+nan", "-nan", "inf", "+inf", "-inf", "infinity", "+infinity",
                         "-infinity"})
_INDEX = re.compile(r"\d+")


def _value_cell(raw: str, line: int) -> tuple[float | None, LabelProblem | None]:
    """A finite real number in plain decimal notation (no ``1_0``, no hex, no NaN/inf)."""
    if raw.lower() in _NON_FINITE:
        return None, _problem(LabelIssue.NOT_FINITE, "the value is NaN or infinite; write the "
                              "study's measured value as a finite number", line)
    if not _DECIMAL.fullmatch(raw):
        what = "empty" if not raw else "not a number"
        return None, _problem(LabelIssue.NOT_NUMBER, f"the value is {what}; write a decimal "
                              "number such as 12.5 (a dot as decimal mark, no units)", line)
    value = float(raw)
    if not math.isfinite(value):
        return None, _problem(LabelIssue.NOT_FINITE, "the value overflows to infinity; write "
                              "it in a smaller unit", line)
    return value, None


def _findings_cell(raw: str, line: int) -> tuple[tuple[int, ...] | None, LabelProblem | None]:
    """Finding indices separated by ``;`` (empty: no finding); no repeats, no empty items."""
    if not raw:
        return (), None
    items = [item.strip() for item in raw.split(FINDINGS_SEPARATOR)]
    if not all(_INDEX.fullmatch(item) for item in items):
        return None, _problem(LabelIssue.BAD_FINDINGS, "the findings are not finding numbers "
                              f"(integers >= 0) separated by '{FINDINGS_SEPARATOR}'; write e.g. "
                              "0;2, or leave the cell empty for no finding", line)
    indices = [int(item) for item in items]
    if len(set(indices)) != len(indices):
        return None, _problem(LabelIssue.BAD_FINDINGS, "the findings list names a finding "
                              "twice; list each finding once", line)
    return tuple(sorted(indices)), None


def _below(num_classes: int | None, task: str) -> TargetCheck[int]:
    """Class or grade < K (any when K is unknown)."""

    def check(label: int, line: int) -> LabelProblem | None:
        if num_classes is None or label < num_classes:
            return None
        return _problem(LabelIssue.CLASS_OUT_OF_RANGE, f"the label is not below the number of "
                        f"classes ({num_classes}) of the {task} task; write a class from 0 to "
                        f"{num_classes - 1}, or give the task more classes", line)

    return check


def _findings_below(num_classes: int | None) -> TargetCheck[tuple[int, ...]]:
    def check(findings: tuple[int, ...], line: int) -> LabelProblem | None:
        if num_classes is None or all(f < num_classes for f in findings):
            return None
        return _problem(LabelIssue.FINDING_OUT_OF_RANGE, "a finding is not below the number "
                        f"of findings ({num_classes}); use findings 0 to {num_classes - 1}, "
                        "or give the task more findings", line)

    return check


def _any_value(value: float, line: int) -> LabelProblem | None:
    return None


def _needs_k(task: str, num_classes: int | None) -> None:
    if num_classes is not None and num_classes < 2:
        raise DataError(f"the {task} task needs at least 2 classes, got {num_classes}",
                        safe_reason=f"the {task} task needs at least 2 classes")


def _fit_k(targets: Mapping[StudyKey, Target]) -> int:
    """The smallest K (at least 2) above every class, grade or finding in ``targets``."""
    top = 1
    for target in targets.values():
        if isinstance(target, tuple):
            top = max((top, *target))
        elif isinstance(target, int):
            top = max(top, target)
    return top + 1


def parse_targets(path: str | Path, task: str, num_classes: int | None = None) -> TargetTable:
    """Validate the labels CSV for ``task`` and return its valid targets and EVERY problem.

    The rows are read by the same machinery as :func:`parse_labels` (one row per study,
    line numbers, conflicts); only the column and its per-cell rules depend on the task.

    Parameters
    ----------
    path : str | Path
        The CSV file. A missing file yields an empty table with ``exists=False``.
    task : str
        A registered task name (:func:`common.tasks.list_tasks`).
    num_classes : int | None
        K: classes (``multiclass``), grades (``ordinal``) or findings (``multilabel``); the
        targets must lie in ``0 .. K-1``. ``None`` checks no upper bound and reports the
        smallest K that fits (``TargetTable.num_classes``). Ignored by ``binary`` (K = 2)
        and ``regression``.

    Returns
    -------
    TargetTable
        For ``segmentation`` and ``reconstruction`` (no column): an empty table that only
        says whether the file exists.

    Raises
    ------
    DataError
        ``num_classes`` below 2. An unknown task raises
        :class:`common.errors.ConfigError` (from :func:`common.tasks.get_task`).
    """
    from common.tasks import get_task

    get_task(task)  # refuses an unknown name with the valid ones
    column = TARGET_COLUMNS.get(task)
    if column is None:
        return TargetTable(task=task, column=None, exists=Path(path).is_file())
    rows: _Rows[Any]
    if task == "binary":
        num_classes = 2
        rows = _read_rows(path, column, _label_problem, _binary_check, what="label")
    elif task == "regression":
        num_classes = None
        rows = _read_rows(path, column, _value_cell, _any_value, what="value")
    elif task == "multilabel":
        _needs_k(task, num_classes)
        rows = _read_rows(path, column, _findings_cell, _findings_below(num_classes),
                          what="findings list")
    else:
        _needs_k(task, num_classes)
        hint = "write a whole number from 0 (the first " + (
            "grade)" if task == "ordinal" else "class)")
        rows = _read_rows(path, column, _integer_cell(hint), _below(num_classes, task),
                          what="label")
    if task in ("multiclass", "ordinal", "multilabel") and num_classes is None:
        num_classes = _fit_k(rows.targets)
    return TargetTable(task=task, column=column, num_classes=num_classes,
                       targets=dict(rows.targets), lines=rows.lines, problems=rows.problems,
                       exists=rows.exists)


def read_labels(path: str | Path) -> dict[tuple[str, str], int]:
    """Parse a labels CSV for training (rules of :func:`parse_labels`).

    Parameters
    ----------
    path : str | Path
        The CSV file. A missing file yields an empty mapping.

    Returns
    -------
    dict[tuple[str, str], int]
        ``(patient_id, study_uid) -> label``.

    Raises
    ------
    DataError
        On the first malformed problem (:data:`MALFORMED`): missing column, empty
        identifier, non-integer or negative label, or the same study listed twice with
        different labels. A label above 1 is returned (the task decides what it accepts).
    """
    table = parse_labels(path)
    if not table.exists:
        logger.info("no labels file: every image is unlabelled")
        return {}
    _raise_first(table.malformed)
    logger.info("read %d study labels", len(table.labels))
    return dict(table.labels)


def read_targets(path: str | Path, task: str,
                 num_classes: int | None = None) -> dict[StudyKey, Target]:
    """Parse a labels CSV for training ``task`` (rules of :func:`parse_targets`).

    Returns
    -------
    dict[tuple[str, str], Target]
        ``(patient_id, study_uid) -> target``; empty for a missing file or a task without a
        column.

    Raises
    ------
    DataError
        On the first problem of :func:`parse_targets` (every one makes the task refuse the
        CSV); the local message names its line, the safe reason neither line nor value.
    """
    table = parse_targets(path, task, num_classes)
    if not table.exists:
        logger.info("no labels file: every image is unlabelled")
        return {}
    _raise_first(table.malformed)
    logger.info("read %d study targets for the %s task", len(table.targets), task)
    return dict(table.targets)


def _raise_first(malformed: tuple[LabelProblem, ...]) -> None:
    if malformed:
        first = malformed[0]
        raise DataError(
            f"labels CSV {first.message()}",
            safe_reason=f"the labels CSV is malformed: {first.safe}",
        )


class _Keyed(Protocol):
    """What :func:`match_problems` reads of a :class:`LabelTable` or :class:`TargetTable`."""

    @property
    def labels(self) -> Mapping[StudyKey, Target]: ...  # pragma: no cover - protocol

    @property
    def lines(self) -> Mapping[StudyKey, int]: ...  # pragma: no cover - protocol

    @property
    def exists(self) -> bool: ...  # pragma: no cover - protocol


def match_problems(table: _Keyed, image_keys: Iterable[StudyKey], *,
                   column: str = "label") -> tuple[LabelProblem, ...]:
    """Problems of the join of labels and usable images.

    Parameters
    ----------
    table : LabelTable | TargetTable
        Parsed labels.
    image_keys : Iterable[tuple[str, str]]
        ((0010,0020) Patient ID, (0020,000D) Study Instance UID) of every usable image
        (one entry per image).
    column : str, keyword-only
        The target column, named in the advice for unlabelled images.

    Returns
    -------
    tuple[LabelProblem, ...]
        One ``no-usable-image`` problem per valid row whose study has no usable image (in
        line order), then one ``unlabelled-images`` problem counting the usable images whose
        study has no valid row.
    """
    per_study = Counter(image_keys)
    labels = table.labels
    problems = [
        _problem(
            LabelIssue.NO_IMAGE,
            "no usable image has this row's patient_id and study_uid; check them against the "
            "images' (0010,0020) Patient ID and (0020,000D) Study Instance UID, or see the "
            "skipped files",
            line,
        )
        for key, line in sorted(table.lines.items(), key=lambda item: item[1])
        if key in labels and key not in per_study
    ]
    unlabelled = {key: n for key, n in per_study.items() if key not in labels}
    if unlabelled and table.exists:
        images = sum(unlabelled.values())
        problems.append(_problem(
            LabelIssue.UNLABELLED_IMAGES,
            f"{images} usable image(s) of {len(unlabelled)} study(ies) have no valid row in "
            f"labels.csv; add one row per study (patient_id, study_uid, {column})"))
    return tuple(problems)
