"""Study-level labels from ``<data_dir>/labels.csv``.

Format: a UTF-8 CSV with the header ``patient_id,study_uid,label`` (extra columns are
ignored, column order is free) and one row per study. ``patient_id`` matches
(0010,0020) Patient ID, ``study_uid`` matches (0020,000D) Study Instance UID and ``label``
is an integer >= 0. Blank lines are ignored. A missing file means "no labels": every image
is then unlabelled (the node check still works, training refuses).

Errors raise :class:`common.errors.DataError`. The local message names the line number;
the ``safe_reason`` (which may leave the node) names neither the path nor any value.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from pathlib import Path

from common.errors import DataError

logger = logging.getLogger(__name__)

LABELS_FILENAME = "labels.csv"
REQUIRED_COLUMNS = ("patient_id", "study_uid", "label")

#: (patient_id, study_uid) -> label
LabelMap = Mapping[tuple[str, str], int]


def _malformed(message: str, safe: str) -> DataError:
    return DataError(message, safe_reason=f"the labels CSV is malformed: {safe}")


def read_labels(path: str | Path) -> dict[tuple[str, str], int]:
    """Parse a labels CSV.

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
        Missing column, empty identifier, non-integer or negative label, or the same
        study listed twice with different labels.
    """
    csv_path = Path(path)
    if not csv_path.is_file():
        logger.info("no labels file: every image is unlabelled")
        return {}
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise _malformed(f"cannot read labels CSV: {exc}", "unreadable or not UTF-8") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise _malformed(
            f"labels CSV header lacks column(s) {missing}; expected {list(REQUIRED_COLUMNS)}",
            "missing column(s) " + ", ".join(missing),
        )
    reader.fieldnames = header
    labels: dict[tuple[str, str], int] = {}
    for row in reader:
        line = reader.line_num
        if not any((v or "").strip() for v in row.values() if isinstance(v, str)):
            continue
        pid = (row.get("patient_id") or "").strip()
        study = (row.get("study_uid") or "").strip()
        raw_label = (row.get("label") or "").strip()
        if not pid or not study:
            raise _malformed(f"labels CSV line {line}: empty patient_id or study_uid", "empty id")
        try:
            label = int(raw_label)
        except ValueError:
            raise _malformed(
                f"labels CSV line {line}: label is not an integer", "non-integer label"
            ) from None
        if label < 0:
            raise _malformed(f"labels CSV line {line}: label is negative", "negative label")
        key = (pid, study)
        if key in labels and labels[key] != label:
            raise _malformed(
                f"labels CSV line {line}: study listed again with a different label",
                "conflicting labels for one study",
            )
        labels[key] = label
    logger.info("read %d study labels", len(labels))
    return labels
