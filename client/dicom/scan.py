"""Scan of a node's data directory: every file is usable or skipped with a reason.

Every regular file under the data directory (recursively) is classified as usable or as
skipped with a :class:`~client.dicom.reasons.SkipCode`. Hidden files and folders (name
starting with ``.``) and the excluded top-level files (the labels CSV) are ignored.

By default the scan is header-only: files are read with pydicom's deferred reads, so the
(7FE0,0010) Pixel Data value is skipped over; only a sample of at most
:data:`client.dicom.layout.SAMPLE_BYTES` of native 16/32-bit pixel bytes is read for the
byte-order check. With ``decode_pixels=True`` every otherwise usable file is also decoded
once, through :func:`client.dicom.pixels.read_pixels` (the code path training uses), and a
file that fails is skipped as ``undecodable`` with the cause.

pydicom's warnings and log records (which quote tag values) are captured per file and never
shown; their counts per kind are logged at INFO (see :mod:`client.dicom.quiet`). The scanner
never raises on a bad file, and no skip text holds a tag value or a path.
"""

from __future__ import annotations

import logging
import os
import stat
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pydicom
from pydicom.datadict import dictionary_description, tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID

from client.dicom.elements import check_element_stream, tag_text
from client.dicom.geometry import Geometry, read_geometry
from client.dicom.index import InstanceRecord
from client.dicom.layout import PIXEL_DATA, check_pixel_layout
from client.dicom.phi import check_deidentified
from client.dicom.pixels import PixelDecodeError, read_pixels
from client.dicom.pixels_color import read_frames
from client.dicom.quiet import Captured, PydicomNoise, quiet_pydicom
from client.dicom.reasons import Skip, SkipCode, SkippedFile

logger = logging.getLogger(__name__)

#: Values larger than this are not read while scanning (pixel data in practice).
DEFER_SIZE_BYTES = 1024
_REQUIRED_IDS = (
    "PatientID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
)
#: Identifying elements named first when duplicated.
_IDENTIFYING = {
    0x00100020: "(0010,0020) Patient ID",
    0x00100010: "(0010,0010) Patient's Name",
    0x0020000D: "(0020,000D) Study Instance UID",
    0x0020000E: "(0020,000E) Series Instance UID",
    0x00080018: "(0008,0018) SOP Instance UID",
}

_MAX_ID_CHARS = 64
_UID_CHARS = re.compile(r"[0-9.]+")

ProgressCallback = Callable[[int, int], None]

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
    pixels_decoded : bool
        ``True`` when every usable file's pixels were decoded once (``decode_pixels``).
    """

    records: tuple[InstanceRecord, ...]
    skipped: tuple[SkippedFile, ...]
    files_seen: int
    pixels_decoded: bool = False


def data_file_signature(data_dir: Path) -> list[tuple[str, int, int]]:
    """``(relpath, size, mtime_ns)`` of every candidate file, sorted by relative path.

    One ``os.scandir`` walk with one ``stat`` per file (a node checks its split cache against
    this on every message). Hidden files and folders (leading ``.``) are skipped; symbolic
    links to files are followed, links to folders and dangling links are not; a folder that
    cannot be listed is skipped, as ``os.walk`` does.
    """
    found: list[tuple[str, int, int]] = []

    def walk(folder: str, prefix: str) -> None:
        try:
            entries = os.scandir(folder)
        except OSError:
            return
        with entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir():  # a real folder, or a link to one (not followed)
                    if not entry.is_symlink():
                        walk(entry.path, f"{prefix}{entry.name}/")
                    continue
                try:
                    st = entry.stat()  # follows a link to its file
                except FileNotFoundError:  # a dangling link, or a file gone meanwhile
                    continue
                if stat.S_ISREG(st.st_mode):
                    found.append((f"{prefix}{entry.name}", st.st_size, st.st_mtime_ns))

    walk(os.fspath(data_dir), "")
    found.sort()
    return found


def iter_data_files(
    data_dir: Path, *, exclude: Collection[str] = ()
) -> Iterator[tuple[Path, str]]:
    """Yield ``(path, relpath)`` for every candidate file, sorted by relative path.

    The files of :func:`data_file_signature` (its rules), less the relative paths in
    ``exclude``.
    """
    for rel, _, _ in data_file_signature(data_dir):
        if rel not in exclude:
            yield data_dir / rel, rel


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


def _read_header(path: Path, captured: Captured) -> Dataset:
    """Read the header with deferred values (inside :func:`quiet_pydicom`).

    Raises ``not-dicom`` when the header cannot be parsed or has no (0002,0010) Transfer
    Syntax UID, and ``truncated`` when pydicom reported that the file ends inside an
    element (it reads such files leniently).
    """
    try:
        ds = pydicom.dcmread(path, defer_size=DEFER_SIZE_BYTES)
    except EOFError as exc:
        raise Skip(SkipCode.TRUNCATED, "file ends inside a data element") from exc
    except Exception as exc:  # noqa: BLE001 - any parse failure is a classification
        text = str(exc).lower()
        if "end of file" in text or "eof" in text or "unexpected end" in text:
            raise Skip(SkipCode.TRUNCATED, "file ends inside a data element") from exc
        raise Skip(SkipCode.NOT_DICOM, "the DICOM header could not be parsed") from exc
    if not str(ds.file_meta.get("TransferSyntaxUID", "") or ""):
        raise Skip(SkipCode.NOT_DICOM, "file meta has no (0002,0010) Transfer Syntax UID")
    if "truncated" in captured.kinds():
        raise Skip(SkipCode.TRUNCATED, "file ends inside a data element")
    return ds


def _check_stream(path: Path) -> None:
    """Refuse duplicated elements and a byte-order mismatch (see :mod:`.elements`)."""
    try:
        stream = check_element_stream(path)
    except Exception as exc:  # noqa: BLE001 - the meta group would not parse either
        raise Skip(SkipCode.NOT_DICOM, "the DICOM header could not be parsed") from exc
    if stream.duplicates:
        first = next((t for t in stream.duplicates if t in _IDENTIFYING), stream.duplicates[0])
        name = _IDENTIFYING.get(first, tag_text(first))
        raise Skip(
            SkipCode.DUPLICATE_ELEMENT,
            f"{name} occurs more than once in the file, so which value holds is ambiguous; "
            "re-export the file from its source",
        )
    if stream.byte_order_mismatch:
        raise Skip(
            SkipCode.TRANSFER_SYNTAX_MISMATCH,
            "the dataset is encoded in the opposite byte order to the one its (0002,0010) "
            "Transfer Syntax UID declares; re-export the file from its source",
        )


def _int_attr(ds: Dataset, keyword: str, default: int | None = None) -> int | None:
    try:
        value = ds.get(keyword, default)
        return default if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return default


def _check_ids(ds: Dataset) -> dict[str, str]:
    ids: dict[str, str] = {}
    for keyword in _REQUIRED_IDS:
        raw = ds.get(keyword, "")
        if isinstance(raw, (list, tuple, MultiValue)):
            tag = tag_for_keyword(keyword) or 0
            raise Skip(
                SkipCode.INVALID_VALUE,
                f"{tag_text(tag)} {dictionary_description(tag)} holds several values "
                "where one is expected; fix the file at its source",
            )
        value = str(raw or "").strip()
        if not value:
            raise Skip(SkipCode.MISSING_UID, f"{keyword} is missing or empty")
        problem = _identifier_problem(keyword, value, extended="SpecificCharacterSet" in ds)
        if problem:
            tag = tag_for_keyword(keyword) or 0
            raise Skip(
                SkipCode.INVALID_VALUE,
                f"{tag_text(tag)} {dictionary_description(tag)} {problem}; "
                "fix the file at its source",
            )
        ids[keyword] = value
    return ids


def _identifier_problem(keyword: str, value: str, *, extended: bool) -> str:
    """Why an identifier value is invalid for its VR (never quoting it), or ``""``.

    (0010,0020) Patient ID is LO: at most 64 characters, no control character, and only
    the default repertoire (printable ASCII) unless (0008,0005) Specific Character Set is
    present. The UIDs are UI: at most 64 characters, digits and dots only (PS3.5 9.1).
    """
    if len(value) > _MAX_ID_CHARS:
        return f"is longer than {_MAX_ID_CHARS} characters"
    if keyword == "PatientID":
        if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in value):
            return "holds control or NUL characters"
        if not extended and any(ord(ch) > 0x7E for ch in value):
            return (
                "holds characters outside the default repertoire and (0008,0005) Specific "
                "Character Set is absent"
            )
        return ""
    if not _UID_CHARS.fullmatch(value):
        return "holds characters other than digits and dots (not a valid UID)"
    return ""


def expected_pixel_bytes(ds: Dataset, rows: int, cols: int, frames: int) -> int:
    """Bytes of native (uncompressed) pixel data the header announces.

    Rows x Columns x Samples per Pixel x Bits Allocated / 8 x Number of Frames, from
    (0028,0010), (0028,0011), (0028,0002), (0028,0100) and (0028,0008); 1-bit data is
    packed, so the bit count is rounded up to whole bytes.
    """
    geometry = Geometry(
        rows=rows,
        columns=cols,
        frames=frames,
        samples=_int_attr(ds, "SamplesPerPixel", 1) or 1,
        bits_allocated=_int_attr(ds, "BitsAllocated", 16) or 16,
        bits_stored=0,
        signed=False,
    )
    return geometry.expected_bytes


def _check_decoder(ds: Dataset) -> None:
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax or not decoder_available(syntax):
        raise Skip(SkipCode.UNSUPPORTED_TRANSFER_SYNTAX)


def _decode(path: Path, noise: PydicomNoise | None, *, color: bool) -> None:
    try:
        if color:
            read_frames(path, noise=noise)
        else:
            read_pixels(path, noise=noise)
    except PixelDecodeError as exc:
        raise Skip(SkipCode.UNDECODABLE, str(exc)) from exc


def _classify(
    path: Path,
    relpath: str,
    *,
    require_deidentified: bool,
    decode_pixels: bool,
    noise: PydicomNoise | None,
    accept_color: bool = False,
) -> InstanceRecord:
    if not _has_dicm_prefix(path):
        raise Skip(SkipCode.NOT_DICOM)
    with quiet_pydicom() as captured:
        try:
            ds = _read_header(path, captured)
            _check_stream(path)
            ids = _check_ids(ds)
            options: tuple[str, ...] = ()
            if require_deidentified:
                verdict = check_deidentified(ds)
                if not verdict.deidentified:
                    raise Skip(SkipCode.PHI, verdict.reason)
                options = tuple(o.value for o in verdict.declared_options)
            if ds.get_item(PIXEL_DATA, keep_deferred=True) is None:
                raise Skip(SkipCode.NO_PIXELS)
            _check_decoder(ds)
            geometry = read_geometry(ds, accept_color=accept_color)
            check_pixel_layout(ds, path, geometry)
            instance_number = _int_attr(ds, "InstanceNumber")
            modality = str(ds.get("Modality", "") or "")
        finally:
            if noise is not None:
                noise.add(captured.kinds())
    if decode_pixels:
        _decode(path, noise, color=geometry.is_color)
    return InstanceRecord(
        path=path,
        relpath=relpath,
        file_size=path.stat().st_size,
        patient_id=ids["PatientID"],
        study_instance_uid=ids["StudyInstanceUID"],
        series_instance_uid=ids["SeriesInstanceUID"],
        sop_instance_uid=ids["SOPInstanceUID"],
        instance_number=instance_number,
        rows=geometry.rows,
        columns=geometry.columns,
        number_of_frames=geometry.frames,
        modality=modality,
        deidentification_options=options,
    )


def classify_file(
    path: Path,
    relpath: str,
    *,
    require_deidentified: bool,
    decode_pixels: bool = False,
    noise: PydicomNoise | None = None,
    accept_color: bool = False,
) -> InstanceRecord | SkippedFile:
    """Classify one file; never raises on a bad file.

    Checks, in order: the 'DICM' prefix after the 128-byte preamble (PS3.10 7.1), a parsable
    header with a (0002,0010) Transfer Syntax UID, no element occurring twice in the raw
    element stream and a dataset encoded in the declared byte order
    (:mod:`client.dicom.elements`), the identifiers (0010,0020) Patient ID, (0020,000D)
    Study Instance UID, (0020,000E) Series Instance UID and (0008,0018) SOP Instance UID,
    de-identification (when required; see :mod:`client.dicom.phi`), presence of (7FE0,0010)
    Pixel Data, a decoder for the transfer syntax, valid IS/DS values and single-sample
    greyscale geometry (:mod:`client.dicom.geometry`), pixel data consistent with the
    syntax and geometry (:mod:`client.dicom.layout`) and, with ``decode_pixels``, one
    decode of the pixels (:func:`client.dicom.pixels.read_pixels`; for a colour image
    :func:`client.dicom.pixels_color.read_frames`).

    Multi-frame files ((0028,0008) Number of Frames > 1) are accepted, as before: training's
    2-D path reads their middle frame, :func:`~client.dicom.pixels_color.read_frames` the
    whole stack.

    Parameters
    ----------
    path : Path
        The file.
    relpath : str
        Its path relative to the data directory (kept in the result only).
    require_deidentified : bool, keyword-only
        Skip files failing :func:`client.dicom.phi.check_deidentified` (code ``phi``).
    decode_pixels : bool, keyword-only
        Decode the pixels of a file that passes every header check.
    noise : PydicomNoise | None, keyword-only
        Receives the kinds of the pydicom messages captured (counts only).
    accept_color : bool, keyword-only
        Also accept colour images (RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT,
        PALETTE COLOR; see :func:`client.dicom.geometry.read_geometry`). Off by default:
        training's 2-D path reads greyscale only.

    Returns
    -------
    InstanceRecord | SkippedFile
        The record of a usable file, or the skip with its reason.
    """
    try:
        return _classify(
            path,
            relpath,
            require_deidentified=require_deidentified,
            decode_pixels=decode_pixels,
            noise=noise,
            accept_color=accept_color,
        )
    except Skip as skip:
        return SkippedFile(relpath=relpath, code=skip.code, detail=skip.detail)
    except Exception as exc:  # noqa: BLE001 - the scanner must never raise on a bad file
        logger.debug("unexpected error while scanning a file: %s", type(exc).__name__)
        return SkippedFile(relpath=relpath, code=SkipCode.NOT_DICOM, detail="unreadable file")


def scan_directory(
    data_dir: str | Path,
    *,
    require_deidentified: bool = True,
    progress: ProgressCallback | None = None,
    exclude: Collection[str] = (),
    decode_pixels: bool = False,
    accept_color: bool = False,
) -> ScanOutcome:
    """Scan every candidate file under ``data_dir``.

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
    decode_pixels : bool, keyword-only
        Decode every otherwise usable file's pixels once; a failure is skipped as
        ``undecodable``. Off by default: the scan is then header-only.
    accept_color : bool, keyword-only
        Also accept colour images (see :func:`classify_file`); for the task layer. Off by
        default, so what training's greyscale path receives is unchanged.

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
    noise = PydicomNoise()
    for done, (path, rel) in enumerate(files, start=1):
        result = classify_file(
            path,
            rel,
            require_deidentified=require_deidentified,
            decode_pixels=decode_pixels,
            noise=noise,
            accept_color=accept_color,
        )
        if isinstance(result, InstanceRecord) and result.sop_instance_uid in seen_uids:
            result = SkippedFile(relpath=rel, code=SkipCode.DUPLICATE)
        if isinstance(result, InstanceRecord):
            seen_uids.add(result.sop_instance_uid)
            records.append(result)
        else:
            skipped.append(result)
        if progress is not None:
            progress(done, total)
    logger.info(
        "scanned %d files (%s): %d usable, %d skipped",
        total,
        "pixels decoded" if decode_pixels else "headers only",
        len(records),
        len(skipped),
    )
    noise.log("scan")
    return ScanOutcome(
        records=tuple(records),
        skipped=tuple(skipped),
        files_seen=total,
        pixels_decoded=decode_pixels,
    )
