"""``vesalius node check``: is this hospital's data folder usable, and if not, what to fix.

The check runs the same rules as training: the file scan of :mod:`client.dicom.scan` and the
labels rules of :func:`client.data.labels.parse_labels` (training reads labels through
:func:`~client.data.labels.read_labels`, built on the same function). It never stops on a bad
row: it lists every problem with its CSV line number and what to fix.

Privacy: every sentence it prints names line numbers, column names and counts only, never a
patient id, a study UID, a label text or a path. The JSON output lists the used and skipped
files by their path *relative to* the ``--data`` folder: the hospital's own local inventory,
which the operator asked for and which never leaves the node.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import typer

from cli.console import console, err_console, progress_bar, table
from client.data.labels import (
    BINARY_LABELS,
    LABELS_FILENAME,
    LabelIssue,
    LabelProblem,
    LabelTable,
    match_problems,
    parse_labels,
)
from client.dicom.index import DicomIndex
from client.dicom.report import IngestionReport, build_report
from client.dicom.scan import ProgressCallback, scan_directory
from common.errors import DataError


class OutputFormat(str, Enum):
    """What ``--format`` accepts."""

    TABLE = "table"
    JSON = "json"


_NO_LABELS_FILE = LabelProblem(
    code=LabelIssue.MISSING_FILE,
    text="the --data folder has no labels.csv; add one with the columns patient_id, "
    "study_uid, label and one row per study",
)


@dataclass(frozen=True)
class DataInspection:
    """What :func:`inspect_data` found in a node's data folder.

    Attributes
    ----------
    report : IngestionReport
        The scan report (labels joined from the valid rows only).
    used_files : tuple[str, ...]
        Usable files, relative to the data folder (local inventory).
    label_problems : tuple[LabelProblem, ...]
        Every problem of the labels CSV and of its join with the images.
    trainable_images : int
        Usable images whose label is in :data:`~client.data.labels.BINARY_LABELS`.
    blocking : tuple[str, ...]
        Why the folder cannot be trained on (empty when it can), one sentence each.
    pixels_decoded : bool
        Whether every used file's pixel data was decoded (not only its header read).
    """

    report: IngestionReport
    used_files: tuple[str, ...]
    label_problems: tuple[LabelProblem, ...]
    trainable_images: int
    blocking: tuple[str, ...]
    pixels_decoded: bool

    @property
    def usable(self) -> bool:
        """Whether training can use this folder."""
        return not self.blocking

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready mapping (``vesalius node check --format json``)."""
        return {
            **self.report.to_dict(),
            "used_files": list(self.used_files),
            "pixels_decoded": self.pixels_decoded,
            "trainable_images": self.trainable_images,
            "label_problems": [p.to_dict() for p in self.label_problems],
            "usable": self.usable,
            "problems": list(self.blocking),
        }


def _blocking(report: IngestionReport, labels: LabelTable, trainable: int) -> list[str]:
    """One sentence per reason why training cannot use the folder."""
    if report.files_seen == 0:
        return ["the --data folder holds no file; copy the node's DICOM studies and "
                "labels.csv into it"]
    reasons: list[str] = []
    if report.files_used == 0:
        reasons.append(f"none of the {report.files_seen} file(s) in the --data folder is a "
                       "usable DICOM image; see the reason given for each skipped file")
    if not labels.exists:
        reasons.append(_NO_LABELS_FILE.text)
    malformed = labels.malformed
    if malformed:
        reasons.append(f"labels.csv has {len(malformed)} malformed row(s) or header problem(s), "
                       "so training would refuse it; fix each line listed under label problems")
    if any(p.code is LabelIssue.NOT_BINARY for p in labels.problems):
        reasons.append("labels.csv has labels other than 0 and 1, which the binary task cannot "
                       "train on; relabel those rows 0 or 1")
    if not reasons and trainable == 0:
        reasons.append("no usable image has a label; make the patient_id and study_uid of "
                       "each labels.csv row match the images' (0010,0020) Patient ID and "
                       "(0020,000D) Study Instance UID")
    return reasons


def inspect_data(
    root: Path,
    *,
    require_deidentified: bool = True,
    decode_pixels: bool = True,
    progress: ProgressCallback | None = None,
) -> DataInspection:
    """Scan a node's data folder and validate its labels with training's rules; never raises on data.

    Parameters
    ----------
    root : Path
        The node's data folder (must exist).
    require_deidentified : bool, keyword-only
        Skip files failing the de-identification check (code ``phi``).
    decode_pixels : bool, keyword-only
        Decode every file's pixel data (code ``undecodable`` when it fails) where the
        scanner supports it; otherwise read headers only.
    progress : Callable[[int, int], None] | None, keyword-only
        Called as ``progress(done, total)`` while scanning.

    Returns
    -------
    DataInspection
        The report, the used files, every label problem and the blocking reasons.
    """
    outcome = scan_directory(root, require_deidentified=require_deidentified, progress=progress,
                             exclude=(LABELS_FILENAME,), decode_pixels=decode_pixels)
    index = DicomIndex.from_records(outcome.records)
    labels = parse_labels(root / LABELS_FILENAME)
    report = build_report(files_seen=outcome.files_seen, skipped=outcome.skipped, index=index,
                          labels=labels.labels, require_deidentified=require_deidentified,
                          pixels_decoded=outcome.pixels_decoded)
    keys = [(rec.patient_id, rec.study_instance_uid) for rec in index.instances()]
    problems = labels.problems + match_problems(labels, keys)
    if not labels.exists:
        problems = (_NO_LABELS_FILE, *problems)
    trainable = sum(1 for key in keys if labels.labels.get(key) in BINARY_LABELS)
    return DataInspection(
        report=report,
        used_files=tuple(sorted(rec.relpath for rec in index.instances())),
        label_problems=problems,
        trainable_images=trainable,
        blocking=tuple(_blocking(report, labels, trainable)),
        pixels_decoded=outcome.pixels_decoded,
    )


def require_data_folder(data: str | Path) -> Path:
    """Resolve ``--data``; a usage error (naming the option, not the path) when it is no folder.

    Taken as text: an empty ``--data ""`` must be refused, not read as the current folder.
    """
    folder = Path(data).expanduser()
    if not str(data).strip() or not folder.is_dir():
        raise typer.BadParameter("the --data folder does not exist or is not a folder; give "
                                 "the folder holding the DICOM files and labels.csv",
                                 param_hint="'--data'")
    return folder.resolve()


def _print_table(found: DataInspection) -> None:
    doc = found.report.to_dict()
    summary = table("Ingestion report of the --data folder", ["item", "value"])
    for key, value in doc.items():
        if key == "fingerprint":
            summary.add_row("dataset fingerprint", f"{str(value)[:16]}…")
        elif not isinstance(value, (list, dict)):
            summary.add_row(key.replace("_", " "), str(value))
    summary.add_row("trainable images (label 0/1)", str(found.trainable_images))
    for key, value in doc.items():
        if isinstance(value, dict):
            summary.add_row(key.replace("_", " "),
                            ", ".join(f"{a}: {b}" for a, b in value.items()) or "-")
    console.print(summary)
    if found.label_problems:
        t = table("Label problems (labels.csv)", ["line", "problem", "what to fix"])
        for problem in found.label_problems:
            line = "-" if problem.line is None else str(problem.line)
            t.add_row(line, problem.code.value, problem.text)
        console.print(t)
    if found.report.skipped:
        t = table("Skipped files", ["file", "reason code", "why"])
        for row in found.report.skipped:
            t.add_row(row.relpath, row.code.value, row.text)
        console.print(t)


def check(
    data: str = typer.Option(..., "--data", help="The node's data folder (DICOM + labels.csv)."),
    output_format: OutputFormat = typer.Option(
        OutputFormat.TABLE, "--format", case_sensitive=False, help="Output format."
    ),
    allow_identified: bool = typer.Option(
        False, "--allow-identified", help="Accept files that carry direct identifiers (PHI)."
    ),
    header_only: bool = typer.Option(
        False, "--header-only",
        help="Read DICOM headers only (quick look); by default every image's pixels are decoded.",
    ),
) -> None:
    """Check the data folder: files used, files skipped (with reasons), every label problem.

    Exits 0 when training can use the folder, 4 when it cannot (the reasons are printed).
    """
    root = require_data_folder(data)
    as_json = output_format is OutputFormat.JSON
    with progress_bar("checking files", enabled=not as_json) as progress:
        found = inspect_data(root, require_deidentified=not allow_identified,
                             decode_pixels=not header_only, progress=progress)
    if as_json:
        console.print_json(json.dumps(found.to_dict()))
    else:
        _print_table(found)
    if not found.usable:
        for reason in found.blocking[:-1]:
            err_console.print(f"[red]error:[/red] {reason}", highlight=False, soft_wrap=True)
        raise DataError(found.blocking[-1], safe_reason="the node's data could not be used")
    if found.label_problems:
        err_console.print(f"[yellow]warning:[/yellow] {len(found.label_problems)} label "
                          "problem(s) listed above; the rest of the data is usable",
                          highlight=False, soft_wrap=True)
