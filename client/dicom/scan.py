"""Header-only scan of a node's data directory.

Every regular file under the data directory (recursively) is classified as usable or as
skipped with a :class:`~client.dicom.reasons.SkipCode`. Hidden files and folders (name
starting with ``.``) and the excluded top-level files (the labels CSV) are ignored. Pixel
data is never decoded or loaded: files are read with pydicom's deferred reads, so the
(7FE0,0010) Pixel Data value is skipped over and only its offset and length are kept.
The scanner never raises on a bad file.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.tag import Tag
from pydicom.uid import UID

from client.dicom.index import InstanceRecord
from client.dicom.phi import check_deidentified
from client.dicom.reasons import SkipCode, SkippedFile

logger = logging.getLogger(__name__)

#: Values larger than this are not read while scanning (pixel data in practice).
DEFER_SIZE_BYTES = 1024
_PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UNDEFINED_LENGTH = 0xFFFFFFFF
_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")
_REQUIRED_IDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)

ProgressCallback = Callable[[int, int], None]


class _Skip(Exception):
    """Internal control flow: the file is skipped with ``code``."""

    def __init__(self, code: SkipCode, detail: str = "") -> None:
        super().__init__(code.value)
        self.code = code
        self.detail = detail


@dataclass(frozen=True)
class ScanOutcome:
    """Result of :func:`scan_directory`.

    Attributes
    ----------
    records : tuple[InstanceRecord, ...]
        Usable files, in relative-path order.
    skipped : tuple[SkippedFile, ...]
        Skipped files with their reason, in relative-path order.
    files_seen : int
        Number of files considered (hidden files and the labels file excluded).
    """

    records: tuple[InstanceRecord, ...]
    skipped: tuple[SkippedFile, ...]
    files_seen: int


def iter_data_files(
    data_dir: Path, *, exclude: Collection[str] = ()
) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, relpath)`` for every candidate file, sorted by relative path.

    Hidden files and folders (leading ``.``) and the relative paths in ``exclude`` are
    skipped; symbolic links to files are followed, links to folders are not.
    """
    found: list[tuple[str, Path]] = []
    for root, dirs, files in os.walk(data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            rel = path.relative_to(data_dir).as_posix()
            if rel in exclude or not path.is_file():
                continue
            found.append((rel, path))
    for rel, path in sorted(found):
        yield path, rel


@lru_cache(maxsize=64)
def decoder_available(transfer_syntax_uid: str) -> bool:
    """Return ``True`` when pydicom can decode pixel data in this transfer syntax here.

    Uses pydicom's decoder registry (:func:`pydicom.pixels.get_decoder`), so the answer
    reflects the optional plugins (pylibjpeg, GDCM, Pillow, ...) actually installed.
    """
    try:
        return bool(get_decoder(UID(transfer_syntax_uid)).is_available)
    except (NotImplementedError, ValueError):
        return False


def _has_dicm_prefix(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def _read_header(path: Path) -> tuple[Dataset, bool]:
    """Read the header with deferred values; return (dataset, ended_early).

    ``ended_early`` is ``True`` when pydicom warned that the file ended inside an element
    (it reads such files leniently). pydicom's warnings, which name the file, are kept out
    of the node's warning stream.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, defer_size=DEFER_SIZE_BYTES)
    except EOFError as exc:
        raise _Skip(SkipCode.TRUNCATED, "file ends inside a data element") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is a classification
        text = str(exc).lower()
        if "end of file" in text or "eof" in text or "unexpected end" in text:
            raise _Skip(SkipCode.TRUNCATED, "file ends inside a data element") from exc
        raise _Skip(SkipCode.NOT_DICOM, "the DICOM header could not be parsed") from exc
    ended_early = any("end of file" in str(w.message).lower() for w in caught)
    return ds, ended_early


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def _check_ids(ds: Dataset) -> dict[str, str]:
    ids: dict[str, str] = {}
    for keyword in _REQUIRED_IDS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            raise _Skip(SkipCode.MISSING_UID, f"{keyword} is missing or empty")
        ids[keyword] = value
    return ids


def _check_image(ds: Dataset) -> tuple[int, int, int]:
    """Check geometry and photometry; return (rows, columns, frames)."""
    rows = _int_attr(ds, "Rows")
    cols = _int_attr(ds, "Columns")
    bits = _int_attr(ds, "BitsAllocated")
    samples = _int_attr(ds, "SamplesPerPixel", 1)
    frames = _int_attr(ds, "NumberOfFrames", 1) or 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not rows or not cols or rows < 1 or cols < 1 or bits not in (1, 8, 16, 32):
        raise _Skip(SkipCode.UNSUPPORTED_IMAGE, "missing or invalid Rows/Columns/Bits Allocated")
    if samples != 1 or photometric not in _GREYSCALE:
        raise _Skip(
            SkipCode.UNSUPPORTED_IMAGE,
            "not greyscale: more than one sample per pixel or a colour photometric interpretation",
        )
    return rows, cols, frames


def expected_pixel_bytes(ds: Dataset, rows: int, cols: int, frames: int) -> int:
    """Bytes of native (uncompressed) pixel data the header announces.

    Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames, from
    (0028,0010), (0028,0011), (0028,0002), (0028,0100) and (0028,0008); 1-bit data is
    packed, so the bit count is rounded up to whole bytes.
    """
    samples = _int_attr(ds, "SamplesPerPixel", 1) or 1
    bits = _int_attr(ds, "BitsAllocated", 16) or 16
    total_bits = rows * cols * samples * bits * frames
    return (total_bits + 7) // 8


def _check_pixel_data(ds: Dataset, path: Path, rows: int, cols: int, frames: int) -> None:
    elem = ds.get_item(_PIXEL_DATA, keep_deferred=True)
    if elem is None:
        raise _Skip(SkipCode.NO_PIXELS)
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax or not decoder_available(syntax):
        raise _Skip(SkipCode.UNSUPPORTED_TRANSFER_SYNTAX)
    if syntax.is_compressed:
        return  # encapsulated: sizes are not predictable; read errors show up as skips
    expected = expected_pixel_bytes(ds, rows, cols, frames)
    if isinstance(elem, RawDataElement):
        declared = elem.length
        if elem.value is not None:
            available = len(elem.value)
        elif syntax.is_deflated:
            available = declared
        else:
            available = path.stat().st_size - int(elem.value_tell or 0)
    else:
        value = elem.value
        declared = available = len(value) if isinstance(value, (bytes, bytearray)) else 0
    if declared == _UNDEFINED_LENGTH or declared < expected or available < declared:
        raise _Skip(SkipCode.TRUNCATED)


def classify_file(
    path: Path, relpath: str, *, require_deidentified: bool
) -> InstanceRecord | SkippedFile:
    """Classify one file from its header; never raises on a bad file.

    Checks, in order: the 'DICM' prefix after the 128-byte preamble (PS3.10 7.1), a parsable
    header, the identifiers (0010,0020) Patient ID, (0020,000D) Study Instance UID,
    (0020,000E) Series Instance UID and (0008,0018) SOP Instance UID, de-identification
    (when required; see :mod:`client.dicom.phi`), presence of (7FE0,0010) Pixel Data, a
    decoder for the (0002,0010) Transfer Syntax UID, single-sample greyscale geometry, and
    for native syntaxes that the pixel data is as long as the header announces.

    Returns
    -------
    InstanceRecord | SkippedFile
        The record of a usable file, or the skip with its reason.
    """
    try:
        if not _has_dicm_prefix(path):
            raise _Skip(SkipCode.NOT_DICOM)
        ds, ended_early = _read_header(path)
        if not str(ds.file_meta.get("TransferSyntaxUID", "") or ""):
            raise _Skip(SkipCode.NOT_DICOM, "file meta has no (0002,0010) Transfer Syntax UID")
        if ended_early:
            raise _Skip(SkipCode.TRUNCATED, "file ends inside a data element")
        ids = _check_ids(ds)
        if require_deidentified and not check_deidentified(ds).deidentified:
            raise _Skip(SkipCode.PHI)
        if ds.get_item(_PIXEL_DATA, keep_deferred=True) is None:
            raise _Skip(SkipCode.NO_PIXELS)
        rows, cols, frames = _check_image(ds)
        _check_pixel_data(ds, path, rows, cols, frames)
        return InstanceRecord(
            path=path,
            relpath=relpath,
            file_size=path.stat().st_size,
            patient_id=ids["PatientID"],
            study_instance_uid=ids["StudyInstanceUID"],
            series_instance_uid=ids["SeriesInstanceUID"],
            sop_instance_uid=ids["SOPInstanceUID"],
            instance_number=_int_attr(ds, "InstanceNumber"),
            rows=rows,
            columns=cols,
            number_of_frames=frames,
            modality=str(ds.get("Modality", "") or ""),
        )
    except _Skip as skip:
        return SkippedFile(relpath=relpath, code=skip.code, detail=skip.detail)
    except Exception as exc:  # noqa: BLE001 - the scanner must never raise on a bad file
        logger.debug("unexpected error while scanning %s: %s", relpath, type(exc).__name__)
        return SkippedFile(relpath=relpath, code=SkipCode.NOT_DICOM, detail="unreadable file")


def scan_directory(
    data_dir: str | Path,
    *,
    require_deidentified: bool = True,
    progress: ProgressCallback | None = None,
    exclude: Collection[str] = (),
) -> ScanOutcome:
    """Scan every candidate file under ``data_dir`` (headers only).

    Parameters
    ----------
    data_dir : str | Path
        The node's data directory.
    require_deidentified : bool, keyword-only
        Skip files that fail :func:`client.dicom.phi.check_deidentified` with code ``phi``.
    progress : Callable[[int, int], None] | None, keyword-only
        Called as ``progress(done, total)`` after each file (the CLI draws a bar with it).
    exclude : Collection[str], keyword-only
        Relative paths not to scan (the labels CSV).

    Returns
    -------
    ScanOutcome
        Usable records and skipped files. A second file with an already indexed
        (0008,0018) SOP Instance UID (in relative-path order) is skipped as ``duplicate``.
    """
    root = Path(data_dir)
    files = list(iter_data_files(root, exclude=exclude))
    total = len(files)
    records: list[InstanceRecord] = []
    skipped: list[SkippedFile] = []
    seen_uids: set[str] = set()
    for done, (path, rel) in enumerate(files, start=1):
        result = classify_file(path, rel, require_deidentified=require_deidentified)
        if isinstance(result, InstanceRecord) and result.sop_instance_uid in seen_uids:
            result = SkippedFile(relpath=rel, code=SkipCode.DUPLICATE)
        if isinstance(result, InstanceRecord):
            seen_uids.add(result.sop_instance_uid)
            records.append(result)
        else:
            skipped.append(result)
        if progress is not None:
            progress(done, total)
    logger.info("scanned %d files: %d usable, %d skipped", total, len(records), len(skipped))
    return ScanOutcome(records=tuple(records), skipped=tuple(skipped), files_seen=total)
