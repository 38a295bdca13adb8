"""``scan_data_dir``: scan (headers, optionally one decode) + index + labels -> (index, report).

The greyscale, binary-labels entry point of the scanner (used by the importer's checks and the
hostile-input harness). ``vesalius node check`` and the node's loaders scan as training does,
colour and multi-frame images included (:func:`client.data.frames.scan_for_training`), with
each task's labels (:mod:`client.data.labels`).
"""

from __future__ import annotations

from pathlib import Path

from client.data.labels import LABELS_FILENAME, read_labels
from client.dicom.index import DicomIndex
from client.dicom.report import IngestionReport, build_report
from client.dicom.scan import ProgressCallback, scan_directory
from common.errors import DataError


def scan_data_dir(
    data_dir: str | Path,
    *,
    require_deidentified: bool = True,
    progress: ProgressCallback | None = None,
    decode_pixels: bool = False,
) -> tuple[DicomIndex, IngestionReport]:
    """Scan a node's data directory and report on it.

    See :func:`scan_with_labels`, which also returns the parsed labels.
    """
    index, report, _ = scan_with_labels(
        data_dir,
        require_deidentified=require_deidentified,
        progress=progress,
        decode_pixels=decode_pixels,
    )
    return index, report


def scan_with_labels(
    data_dir: str | Path,
    *,
    require_deidentified: bool = True,
    progress: ProgressCallback | None = None,
    decode_pixels: bool = False,
) -> tuple[DicomIndex, IngestionReport, dict[tuple[str, str], int]]:
    """Scan a node's data directory and report on it.

    Parameters
    ----------
    data_dir : str | Path
        The node's data directory (from node configuration only).
    require_deidentified : bool, keyword-only
        Skip files that are not de-identified (code ``phi``); see :mod:`client.dicom.phi`.
    progress : Callable[[int, int], None] | None, keyword-only
        Called as ``progress(done, total)`` after each file.
    decode_pixels : bool, keyword-only
        Decode every otherwise usable file's pixels once, as training does, and skip the
        files that fail (code ``undecodable``). Off: the scan is header-only and the report
        says so (``pixels_checked`` is ``"header only"``).

    Returns
    -------
    tuple[DicomIndex, IngestionReport, dict]
        The index of usable files, the ingestion report (with label counts when
        ``<data_dir>/labels.csv`` exists) and the labels, parsed once.

    Raises
    ------
    common.errors.DataError
        ``data_dir`` is not a directory, or the labels CSV is malformed.
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(
            f"data directory {root} does not exist or is not a directory",
            safe_reason="the node's data directory is missing",
        )
    outcome = scan_directory(
        root,
        require_deidentified=require_deidentified,
        progress=progress,
        exclude=(LABELS_FILENAME,),
        decode_pixels=decode_pixels,
    )
    index = DicomIndex.from_records(outcome.records)
    labels = read_labels(root / LABELS_FILENAME)
    report = build_report(
        files_seen=outcome.files_seen,
        skipped=outcome.skipped,
        index=index,
        labels=labels,
        require_deidentified=require_deidentified,
        pixels_decoded=outcome.pixels_decoded,
    )
    return index, report, labels
