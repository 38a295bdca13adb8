"""Study-level labels from ``<data_dir>/labels.csv``: one set of rules for training and checks.

Format: a UTF-8 CSV with the header ``patient_id,study_uid,label`` (extra columns are
ignored, column order is free) and one row per study. ``patient_id`` matches
(0010,0020) Patient ID, ``study_uid`` matches (0020,000D) Study Instance UID and ``label``
is an integer >= 0. Blank lines are ignored. A missing file means "no labels": every image
is then unlabelled (the node check still works, training refuses).

:func:`parse_labels` is the single validator: it never raises and returns every problem it
finds, each with the CSV line number, a stable code and one sentence saying what to fix.
:func:`read_labels` (what training uses) raises :class:`common.errors.DataError` on the
first *malformed* row; :func:`match_problems` adds the problems that need the scanned
images (a row without a usable image, images without a row).

Privacy: no problem sentence contains a patient id, a study UID, a label text or a path;
only line numbers and column names. The local message of a :class:`DataError` names the
line number; its ``safe_reason`` (which may leave the node) names neither line nor value.
"""

from __future__ import annotations

import csv
import logging
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from common.errors import DataError

logger = logging.getLogger(__name__)

LABELS_FILENAME = "labels.csv"
REQUIRED_COLUMNS = ("patient_id", "study_uid", "label")
#: The labels the (binary) classification task can train on today.
BINARY_LABELS = frozenset({0, 1})

#: (patient_id, study_uid) -> label
LabelMap = Mapping[tuple[str, str], int]
StudyKey = tuple[str, str]


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
})

#: Short reasons that may leave the node (no line number, no value).
_SAFE: dict[LabelIssue, str] = {
    LabelIssue.UNREADABLE: "unreadable or not UTF-8",
    LabelIssue.BAD_CSV: "not parseable as CSV",
    LabelIssue.EMPTY_ID: "empty id",
    LabelIssue.NOT_INTEGER: "non-integer label",
    LabelIssue.NEGATIVE: "negative label",
    LabelIssue.CONFLICT: "conflicting labels for one study",
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


def _problem(code: LabelIssue, text: str, line: int | None = None) -> LabelProblem:
    return LabelProblem(code=code, text=text, line=line, safe=_SAFE.get(code, code.value))


def _header_problem(header: list[str]) -> LabelProblem | None:
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if not missing:
        return None
    return LabelProblem(
        code=LabelIssue.MISSING_COLUMN,
        text=f"the header lacks the column(s) {', '.join(missing)}; the first line must "
        f"name the columns {', '.join(REQUIRED_COLUMNS)}",
        line=1,
        safe="missing column(s) " + ", ".join(missing),
    )


def _label_problem(raw: str, line: int) -> tuple[int | None, LabelProblem | None]:
    """Parse one label cell: ``(label, None)``, or ``(None, problem)`` when malformed."""
    if not raw:
        return None, _problem(LabelIssue.NOT_INTEGER, "the label is empty; write 0 or 1", line)
    try:
        label = int(raw)
    except ValueError:
        return None, _problem(
            LabelIssue.NOT_INTEGER, "the label is not an integer; write 0 or 1", line
        )
    if label < 0:
        return None, _problem(LabelIssue.NEGATIVE, "the label is negative; write 0 or 1", line)
    return label, None


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
    csv_path = Path(path)
    if not csv_path.is_file():
        return LabelTable(exists=False)
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError):
        return LabelTable(problems=(_problem(
            LabelIssue.UNREADABLE, "labels.csv cannot be read as UTF-8 text; save it as a "
            "UTF-8 CSV file readable by the node's user"),))
    reader = csv.DictReader(text.splitlines())
    try:
        header = [(h or "").strip() for h in (reader.fieldnames or [])]
    except csv.Error:
        header = []
    missing = _header_problem(header)
    if missing is not None:
        return LabelTable(problems=(missing,))
    reader.fieldnames = header
    labels: dict[StudyKey, int] = {}
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
        label, bad_label = _label_problem((row.get("label") or "").strip(), line)
        row_problems = [p for p in (_empty_id(pid, study, line), bad_label) if p is not None]
        if row_problems or label is None:
            problems.extend(row_problems)
            continue
        key = (pid, study)
        if key in lines:
            if labels.get(key, label) != label or key in conflicted:
                problems.append(_problem(
                    LabelIssue.CONFLICT, f"the same study is listed on line {lines[key]} with a "
                    "different label; keep one row per study, with the right label", line))
                conflicted.add(key)
                labels.pop(key, None)
            continue
        if label not in BINARY_LABELS:
            problems.append(_problem(
                LabelIssue.NOT_BINARY, "the label is neither 0 nor 1, so the binary task "
                "cannot use it; write 0 or 1", line))
        labels[key] = label
        lines[key] = line
    return LabelTable(labels=labels, lines=lines, problems=tuple(problems))


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
    malformed = table.malformed
    if malformed:
        first = malformed[0]
        raise DataError(
            f"labels CSV {first.message()}",
            safe_reason=f"the labels CSV is malformed: {first.safe}",
        )
    logger.info("read %d study labels", len(table.labels))
    return dict(table.labels)


def match_problems(table: LabelTable, image_keys: Iterable[StudyKey]) -> tuple[LabelProblem, ...]:
    """Problems of the join of labels and usable images.

    Parameters
    ----------
    table : LabelTable
        Parsed labels.
    image_keys : Iterable[tuple[str, str]]
        ((0010,0020) Patient ID, (0020,000D) Study Instance UID) of every usable image
        (one entry per image).

    Returns
    -------
    tuple[LabelProblem, ...]
        One ``no-usable-image`` problem per valid row whose study has no usable image (in
        line order), then one ``unlabelled-images`` problem counting the usable images whose
        study has no valid row.
    """
    per_study = Counter(image_keys)
    problems = [
        _problem(
            LabelIssue.NO_IMAGE,
            "no usable image has this row's patient_id and study_uid; check them against the "
            "images' (0010,0020) Patient ID and (0020,000D) Study Instance UID, or see the "
            "skipped files",
            line,
        )
        for key, line in sorted(table.lines.items(), key=lambda item: item[1])
        if key in table.labels and key not in per_study
    ]
    unlabelled = {key: n for key, n in per_study.items() if key not in table.labels}
    if unlabelled and table.exists:
        images = sum(unlabelled.values())
        problems.append(_problem(
            LabelIssue.UNLABELLED_IMAGES,
            f"{images} usable image(s) of {len(unlabelled)} study(ies) have no valid row in "
            "labels.csv; add one row per study (patient_id, study_uid, label)"))
    return tuple(problems)
