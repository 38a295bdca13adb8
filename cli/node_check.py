"""``vesalius node check``: is this hospital's data folder usable, and if not, what to fix.

The check runs the same rules as training: the file scan of :mod:`client.dicom.scan` and the
labels rules of :func:`client.data.labels.parse_labels` (training reads labels through
:func:`~client.data.labels.read_labels`, built on the same function). It never stops on a bad
row: it lists every problem with its CSV line number and what to fix.

``--task`` (default ``binary``, which keeps the original checks) picks the task's rules:
``multiclass``, ``ordinal``, ``multilabel`` and ``regression`` validate their column of
``labels.csv`` with :func:`client.data.labels.parse_targets` (``--num-classes`` K bounds the
classes, grades or findings; without it the smallest K that fits is reported);
``reconstruction`` needs no labels (every usable image is trainable); ``segmentation`` needs
no labels but a mask for every image: DICOM SEG files (Segmentation Storage) matched to their
source images by :func:`client.dicom.seg.match_segmentations`, or derived mask images
((0008,0060) Modality :data:`client.dicom.synth_seg.MASK_MODALITY`) whose (0008,1140)
Referenced Image Sequence names the image, as :mod:`client.data.segmentation` pairs them.

Privacy: every sentence it prints names line numbers, column names and counts only, never a
patient id, a study UID, a label text or a path. The JSON output lists the used and skipped
files by their path *relative to* the ``--data`` folder: the hospital's own local inventory,
which the operator asked for and which never leaves the node.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from collections import Counter
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

import click
import pydicom
import typer

from cli.console import console, err_console, progress_bar, table
from cli.options import LazyChoice
from client.data.labels import (
    BINARY_LABELS,
    LABELS_FILENAME,
    TARGET_COLUMNS,
    LabelIssue,
    LabelProblem,
    LabelTable,
    StudyKey,
    TargetTable,
    match_problems,
    parse_labels,
    parse_targets,
)
from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.report import UNLABELLED, IngestionReport, build_report
from client.dicom.scan import ProgressCallback, ScanOutcome, scan_directory
from client.data.frames import scan_for_training
from client.dicom.series_check import SeriesCheck, check_series
from common.config import SAMPLE_KINDS
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
    task : str
        The task whose rules were applied.
    num_classes : int | None
        K checked (or fitted) for the classification tasks; ``None`` for the others.
    masks : int | None
        Mask files found (``segmentation`` only): DICOM SEG files and derived mask images.
    mask_problems : tuple[dict[str, object], ...]
        Mask files that label no usable image (``segmentation`` only): path relative to the
        data folder, code (:class:`client.dicom.seg.MaskCode`), sentence.
    series : SeriesCheck | None
        Which studies assemble into a volume (``--samples volume-3d`` or ``series`` only).
    """

    report: IngestionReport
    used_files: tuple[str, ...]
    label_problems: tuple[LabelProblem, ...]
    trainable_images: int
    blocking: tuple[str, ...]
    pixels_decoded: bool
    task: str = "binary"
    num_classes: int | None = None
    masks: int | None = None
    mask_problems: tuple[dict[str, object], ...] = ()
    series: SeriesCheck | None = None

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
            "task": self.task,
            **({} if self.num_classes is None else {"num_classes": self.num_classes}),
            **({} if self.masks is None else {"masks": self.masks,
                                              "mask_problems": list(self.mask_problems)}),
            **({} if self.series is None else {"series": self.series.to_dict()}),
        }


_NONE_LABELLED = ("no usable image has a label; make the patient_id and study_uid of each "
                  "labels.csv row match the images' (0010,0020) Patient ID and (0020,000D) "
                  "Study Instance UID")


def _files_blocking(report: IngestionReport, *, labels: bool = True) -> list[str]:
    """The reasons that concern the files alone (no file, no usable image)."""
    if report.files_seen == 0:
        return ["the --data folder holds no file; copy the node's DICOM studies"
                + (" and labels.csv" if labels else "") + " into it"]
    if report.files_used == 0:
        return [f"none of the {report.files_seen} file(s) in the --data folder is a "
                "usable DICOM image; see the reason given for each skipped file"]
    return []


def _blocking(report: IngestionReport, labels: LabelTable, trainable: int) -> list[str]:
    """One sentence per reason why training cannot use the folder (binary task)."""
    reasons = _files_blocking(report)
    if report.files_seen == 0:
        return reasons
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
        reasons.append(_NONE_LABELLED)
    return reasons


def _missing_file(column: str) -> LabelProblem:
    return LabelProblem(
        code=LabelIssue.MISSING_FILE,
        text=f"the --data folder has no labels.csv; add one with the columns patient_id, "
        f"study_uid, {column} and one row per study")


def _label_counts(table: TargetTable, keys: list[StudyKey]) -> dict[str, int]:
    """Usable images per target as the report shows them: classes as they are, ``finding k``
    per finding and ``no finding`` (multilabel), ``value`` (regression), then ``unlabelled``."""
    counts: Counter[str] = Counter()
    for key in keys:
        target = table.targets.get(key)
        if target is None:
            counts[UNLABELLED] += 1
        elif isinstance(target, tuple):
            counts.update([f"finding {f}" for f in target] or ["no finding"])
        elif isinstance(target, float):
            counts["value"] += 1
        else:
            counts[str(target)] += 1
    shown = {k: counts[k] for k in sorted(counts, key=_count_order) if k != UNLABELLED}
    return {**shown, UNLABELLED: counts[UNLABELLED]}


def _count_order(key: str) -> tuple[int, str]:
    digits = key.rsplit(" ", 1)[-1]
    return (int(digits), key) if digits.isdigit() else (1 << 30, key)


def _referenced_image(rec: InstanceRecord) -> str | None:
    """(0008,1155) Referenced SOP Instance UID of a derived mask's first (0008,1140) item."""
    try:
        header = pydicom.dcmread(rec.path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - the scanner read it; a failure here means "no reference"
        return None
    seq = header.get("ReferencedImageSequence")
    return str(seq[0].get("ReferencedSOPInstanceUID", "") or "") or None if seq else None


@dataclass(frozen=True)
class _Masks:
    """Masks of a folder: DICOM SEG files (matched by :mod:`client.dicom.seg`) and derived
    mask images (:mod:`client.data.segmentation`'s convention), and the images they label."""

    count: int
    masked: frozenset[str]
    images: tuple[InstanceRecord, ...]
    problems: tuple[dict[str, object], ...]


def _find_masks(records: list[InstanceRecord]) -> _Masks:
    from client.dicom.seg import MaskCode, match_segmentations
    from client.dicom.synth_seg import MASK_MODALITY

    seg = match_segmentations(records)
    derived = [r for r in seg.images if r.modality.strip().upper() == MASK_MODALITY]
    images = tuple(r for r in seg.images if r.modality.strip().upper() != MASK_MODALITY)
    known = {r.sop_instance_uid for r in images}
    masked = {m.image.sop_instance_uid for m in seg.matched}
    problems = [r.to_dict() for r in seg.reports if r.code is not MaskCode.MATCHED]
    for rec in derived:
        target = _referenced_image(rec)
        if target in known:
            masked.add(str(target))
        else:
            problems.append({"path": rec.relpath, "code": "missing-image", "images_matched": 0,
                             "text": "the mask's (0008,1140) Referenced Image Sequence names "
                             "no usable image by (0008,1155) Referenced SOP Instance UID"})
    return _Masks(count=len(seg.reports) + len(derived), masked=frozenset(masked),
                  images=images, problems=tuple(problems))


@dataclass(frozen=True)
class _Scan:
    """One scan of the folder, shared by the per-task checks."""

    root: Path
    outcome: ScanOutcome
    index: DicomIndex
    require_deidentified: bool

    def report(self, labels: Mapping[StudyKey, int]) -> IngestionReport:
        return build_report(files_seen=self.outcome.files_seen, skipped=self.outcome.skipped,
                            index=self.index, labels=labels,
                            require_deidentified=self.require_deidentified,
                            pixels_decoded=self.outcome.pixels_decoded)

    @property
    def keys(self) -> list[StudyKey]:
        return [(rec.patient_id, rec.study_instance_uid) for rec in self.index.instances()]

    @property
    def used_files(self) -> tuple[str, ...]:
        return tuple(sorted(rec.relpath for rec in self.index.instances()))


def _inspect_binary(scan: _Scan) -> DataInspection:
    labels = parse_labels(scan.root / LABELS_FILENAME)
    report = scan.report(labels.labels)
    keys = scan.keys
    problems = labels.problems + match_problems(labels, keys)
    if not labels.exists:
        problems = (_NO_LABELS_FILE, *problems)
    trainable = sum(1 for key in keys if labels.labels.get(key) in BINARY_LABELS)
    return DataInspection(
        report=report,
        used_files=scan.used_files,
        label_problems=problems,
        trainable_images=trainable,
        blocking=tuple(_blocking(report, labels, trainable)),
        pixels_decoded=scan.outcome.pixels_decoded,
    )


def _inspect_targets(scan: _Scan, task: str, num_classes: int | None) -> DataInspection:
    """A task with a target column: its rules on labels.csv, then the join with the images."""
    table = parse_targets(scan.root / LABELS_FILENAME, task, num_classes)
    column = table.column or "label"
    keys = scan.keys
    report = replace(scan.report(dict.fromkeys(table.targets, 0)),
                     label_counts=_label_counts(table, keys))
    problems = table.problems + match_problems(table, keys, column=column)
    if not table.exists:
        problems = (_missing_file(column), *problems)
    trainable = sum(1 for key in keys if key in table.targets)
    reasons = _files_blocking(report)
    if report.files_seen:
        if not table.exists:
            reasons.append(_missing_file(column).text)
        if table.problems:
            reasons.append(f"labels.csv has {len(table.problems)} row(s) or header problem(s) "
                           f"that the {task} task cannot use, so training would refuse it; fix "
                           "each line listed under label problems")
        if not reasons and trainable == 0:
            reasons.append(_NONE_LABELLED)
    return DataInspection(
        report=report, used_files=scan.used_files, label_problems=problems,
        trainable_images=trainable, blocking=tuple(reasons),
        pixels_decoded=scan.outcome.pixels_decoded, task=task, num_classes=table.num_classes)


def _inspect_without_labels(scan: _Scan, task: str) -> DataInspection:
    """Reconstruction (every usable image is a target) or segmentation (masks needed)."""
    report = scan.report({})
    reasons = _files_blocking(report, labels=False)
    if task != "segmentation":
        return DataInspection(
            report=report, used_files=scan.used_files, label_problems=(),
            trainable_images=report.files_used, blocking=tuple(reasons),
            pixels_decoded=scan.outcome.pixels_decoded, task=task)
    found = _find_masks(list(scan.index.instances()))
    trainable = sum(1 for r in found.images if r.sop_instance_uid in found.masked)
    unmasked = len(found.images) - trainable
    if not reasons and found.count == 0:
        reasons.append("the --data folder has no segmentation mask; add a DICOM SEG "
                       "(Segmentation Storage) per series, or the mask series that "
                       "`vesalius synth --task segmentation` writes")
    elif not reasons and unmasked:
        reasons.append(f"{unmasked} usable image(s) have no mask that references them by "
                       "(0008,0018) SOP Instance UID, and segmentation training needs one per "
                       "image; add their masks or move those images out of the --data folder")
    return DataInspection(
        report=report, used_files=scan.used_files, label_problems=(),
        trainable_images=trainable, blocking=tuple(reasons),
        pixels_decoded=scan.outcome.pixels_decoded, task=task, masks=found.count,
        mask_problems=found.problems)


def inspect_data(
    root: Path,
    *,
    task: str = "binary",
    num_classes: int | None = None,
    require_deidentified: bool = True,
    decode_pixels: bool = True,
    progress: ProgressCallback | None = None,
    samples: str = "image-2d",
) -> DataInspection:
    """Scan a node's data folder and validate its labels with training's rules; never raises on data.

    Parameters
    ----------
    root : Path
        The node's data folder (must exist).
    task : str, keyword-only
        The task whose rules apply (a registered name; ``binary`` keeps the original checks).
    num_classes : int | None, keyword-only
        K for ``multiclass``, ``ordinal`` and ``multilabel`` (``None``: fitted and reported).
    require_deidentified : bool, keyword-only
        Skip files failing the de-identification check (code ``phi``).
    decode_pixels : bool, keyword-only
        Decode every file's pixel data (code ``undecodable`` when it fails) where the
        scanner supports it; otherwise read headers only.
    progress : Callable[[int, int], None] | None, keyword-only
        Called as ``progress(done, total)`` while scanning.
    samples : str, keyword-only
        ``volume-3d`` or ``series``: also check that each study assembles into a volume
        (:func:`client.dicom.series_check.check_series`); a folder where none does cannot
        train on volumes.

    Returns
    -------
    DataInspection
        The report, the used files, every label problem and the blocking reasons.
    """
    # the scan training uses: colour and multi-frame images are usable (client/data/frames.py)
    outcome = scan_for_training(root, require_deidentified=require_deidentified,
                                progress=progress, decode_pixels=decode_pixels)
    scan = _Scan(root=root, outcome=outcome, index=DicomIndex.from_records(outcome.records),
                 require_deidentified=require_deidentified)
    if task == "binary":
        found = _inspect_binary(scan)
    elif task in TARGET_COLUMNS:
        found = _inspect_targets(scan, task, num_classes)
    else:
        found = _inspect_without_labels(scan, task)
    if samples == "image-2d":
        return found
    series = check_series(scan.index)
    blocking = found.blocking
    multi_frame = any(r.number_of_frames > 1 for r in scan.index.instances())
    if not blocking and series.volumes == 0 and not multi_frame:
        blocking = ("no study assembles into a volume (see the series problems: each needs "
                    "single-frame slices with (0020,0037), (0020,0032) and (0028,0030), evenly "
                    "spaced along the slice normal); train on 2-D images with --samples "
                    "image-2d instead",)
    return replace(found, series=series, blocking=blocking)


def task_names() -> list[str]:
    """The registered task names, in registry order (the choices of ``--task``)."""
    from common.tasks import list_tasks

    return [t.info.name for t in list_tasks()]


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
    what = "label 0/1" if found.task == "binary" else found.task
    summary.add_row(f"trainable images ({what})", str(found.trainable_images))
    if found.num_classes is not None:
        summary.add_row("classes (K)", str(found.num_classes))
    if found.masks is not None:
        summary.add_row("segmentation masks", str(found.masks))
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
    if found.series is not None:
        summary = table("Volumes (one per study)", ["item", "value"])
        summary.add_row("studies", str(found.series.studies))
        summary.add_row("studies that assemble into a volume", str(found.series.volumes))
        summary.add_row("series by outcome", ", ".join(
            f"{code}: {n}" for code, n in sorted(found.series.codes.items())) or "-")
        console.print(summary)
        if found.series.problems:
            t = table("Series problems (these series are left out of volume training)",
                      ["study folder", "code", "slices", "why"])
            for row in found.series.problems:
                t.add_row(str(row["folder"]), str(row["code"]), str(row["slices"]),
                          str(row["text"]))
            console.print(t)
    if found.mask_problems:
        t = table("Mask problems", ["file", "code", "why"])
        for row in found.mask_problems:
            t.add_row(str(row["path"]), str(row["code"]), str(row["text"]))
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
    task: str = typer.Option(
        "binary", "--task", click_type=LazyChoice(task_names),
        help="The task whose label rules apply (reconstruction needs no labels.csv, "
        "segmentation needs mask files instead).",
    ),
    num_classes: int | None = typer.Option(
        None, "--num-classes", min=2,
        help="K: classes (multiclass), grades (ordinal) or findings (multilabel); "
        "by default the smallest K that fits the labels is reported.",
    ),
    samples: str = typer.Option(
        "image-2d", "--samples", click_type=click.Choice(list(SAMPLE_KINDS)),
        help="volume-3d or series: also check that each study's series assembles into one "
        "volume (gaps, mixed orientations, inconsistent spacing are reported per series).",
    ),
) -> None:
    """Check the data folder: files used, files skipped (with reasons), every label problem.

    Exits 0 when training can use the folder, 4 when it cannot (the reasons are printed).
    """
    root = require_data_folder(data)
    as_json = output_format is OutputFormat.JSON
    with progress_bar("checking files", enabled=not as_json) as progress:
        found = inspect_data(root, task=task, num_classes=num_classes,
                             require_deidentified=not allow_identified,
                             decode_pixels=not header_only, progress=progress, samples=samples)
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
