"""DICOM Segmentation (SEG) objects matched to the images they label.

A DICOM SEG (Segmentation Storage, SOP Class 1.2.840.10008.5.1.4.1.1.66.4, PS3.3 A.51) is
read with ``highdicom`` (:class:`highdicom.seg.Segmentation`). Each frame of a SEG names
its source image in its (5200,9230) Per-frame Functional Groups Sequence item: (0008,9124)
Derivation Image Sequence -> (0008,2112) Source Image Sequence -> (0008,1155) Referenced
SOP Instance UID; its segment in (0062,000A) Segment Identification Sequence ->
(0062,000B) Referenced Segment Number. A mask is matched to the usable image whose
(0008,0018) SOP Instance UID is that reference.

Per SEG file one :class:`MaskReport` (a :class:`MaskCode` and a sentence with tags and
counts, never a value, UID or path):

* ``matched``: every referenced image is usable and has the SEG's Rows x Columns;
* ``missing-image``: some referenced images are not among the usable images (absent,
  or skipped by the scanner, e.g. not de-identified); the others are still matched;
* ``shape-mismatch``: a referenced image's (0028,0010) Rows / (0028,0011) Columns differ
  from the SEG's; those images are not matched;
* ``no-source-reference``: a frame has no (0008,1155) (a SEG positioned by (0020,0032)
  only is not matched);
* ``spatial-not-preserved``: (0028,135A) Spatial Locations Preserved is ``NO`` or
  ``REORIENTED_ONLY`` for a source, so its pixels do not line up with the image;
* ``multi-frame-source``: a frame references a frame of a multi-frame image ((0008,1160)
  Referenced Frame Number), which is not matched;
* ``unreadable``: highdicom (or pydicom) could not read the object.

A missing (0028,135A) is taken as ``YES`` (common in practice, e.g. dcmqi's output).
Masks are uint8 ``[segments, rows, cols]``, 1 inside; a FRACTIONAL SEG is thresholded at
one half of its (0062,000E) Maximum Fractional Value.

The project's older mask convention (single-frame derived images, (0008,0060) Modality
``OT``, a (0008,1140) Referenced Image Sequence; :mod:`client.data.segmentation`) is not a
SEG and is left to that module: only Segmentation Storage instances are read here, every
other record is a candidate image.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from client.dicom.index import InstanceRecord
from client.dicom.quiet import PydicomNoise, quiet_pydicom
from client.dicom.scan import ScanOutcome, scan_directory

logger = logging.getLogger(__name__)

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
_HIGHDICOM_LOGGER = logging.getLogger("highdicom")
_NOT_PRESERVED = ("NO", "REORIENTED_ONLY")


class MaskCode(str, Enum):
    """Stable codes for the outcome of matching one SEG file."""

    MATCHED = "matched"
    MISSING_IMAGE = "missing-image"
    SHAPE_MISMATCH = "shape-mismatch"
    NO_SOURCE_REFERENCE = "no-source-reference"
    SPATIAL_NOT_PRESERVED = "spatial-not-preserved"
    MULTI_FRAME_SOURCE = "multi-frame-source"
    UNREADABLE = "unreadable"

    @property
    def text(self) -> str:
        """The fixed human sentence for this code."""
        return MASK_TEXT[self]


MASK_TEXT: dict[MaskCode, str] = {
    MaskCode.MATCHED: "every frame of the segmentation was matched to its image",
    MaskCode.MISSING_IMAGE: (
        "the segmentation references images that are not among the usable images "
        "(absent or skipped by the scanner)"
    ),
    MaskCode.SHAPE_MISMATCH: (
        "the segmentation's (0028,0010) Rows / (0028,0011) Columns differ from its image's"
    ),
    MaskCode.NO_SOURCE_REFERENCE: (
        "a segmentation frame names no source image: no (0008,1155) Referenced SOP Instance "
        "UID in (0008,9124) Derivation Image Sequence / (0008,2112) Source Image Sequence"
    ),
    MaskCode.SPATIAL_NOT_PRESERVED: (
        "(0028,135A) Spatial Locations Preserved says a mask does not line up with its image"
    ),
    MaskCode.MULTI_FRAME_SOURCE: (
        "a segmentation frame references a frame of a multi-frame image ((0008,1160) "
        "Referenced Frame Number), which is not supported"
    ),
    MaskCode.UNREADABLE: "the segmentation object could not be read",
}


@dataclass(frozen=True)
class MaskReport:
    """The outcome for one SEG file.

    Attributes
    ----------
    relpath : str
        The SEG file, relative to the data directory (local reports only, as for
        :class:`~client.dicom.reasons.SkippedFile`).
    code : MaskCode
        The stable outcome code.
    detail : str
        A sentence with tags and counts only; ``code.text`` when empty.
    images_matched : int
        Images that received masks from this file.
    """

    relpath: str
    code: MaskCode
    detail: str = ""
    images_matched: int = 0

    @property
    def text(self) -> str:
        """Human sentence (tags and counts, never values)."""
        return self.detail or self.code.text

    def to_dict(self) -> dict[str, object]:
        """JSON-ready ``{"path", "code", "text", "images_matched"}`` (local reports)."""
        return {
            "path": self.relpath,
            "code": self.code.value,
            "text": self.text,
            "images_matched": self.images_matched,
        }


@dataclass(frozen=True, eq=False)
class MatchedMask:
    """The masks of one image from one SEG file.

    Attributes
    ----------
    image : InstanceRecord
        The labelled image.
    masks : numpy.ndarray
        uint8 ``[segments, rows, cols]``, 1 inside the segment.
    segment_numbers : tuple[int, ...]
        (0062,0004) Segment Number of each mask, in ``masks`` order.
    segment_labels : tuple[str, ...]
        (0062,0005) Segment Label of each (local use only; never logged).
    seg_relpath : str
        The SEG file the masks came from (local use only).
    """

    image: InstanceRecord
    masks: npt.NDArray[np.uint8]
    segment_numbers: tuple[int, ...]
    segment_labels: tuple[str, ...]
    seg_relpath: str


@dataclass(frozen=True, eq=False)
class SegMatchOutcome:
    """Result of :func:`match_segmentations`."""

    matched: tuple[MatchedMask, ...]
    reports: tuple[MaskReport, ...]
    images: tuple[InstanceRecord, ...]

    @property
    def code_counts(self) -> dict[str, int]:
        """SEG files per outcome code (every code listed)."""
        counts = {code.value: 0 for code in MaskCode}
        for report in self.reports:
            counts[report.code.value] += 1
        return counts


class _Refused(Exception):
    def __init__(self, code: MaskCode, detail: str = "") -> None:
        super().__init__(code.value)
        self.code = code
        self.detail = detail


@contextmanager
def _quiet_highdicom() -> Iterator[None]:
    """Keep highdicom's log records (which may quote UIDs) off the node's streams."""
    saved = _HIGHDICOM_LOGGER.disabled
    _HIGHDICOM_LOGGER.disabled = True
    try:
        yield
    finally:
        _HIGHDICOM_LOGGER.disabled = saved


def is_segmentation(ds: Dataset) -> bool:
    """``True`` when (0008,0016) SOP Class UID is Segmentation Storage."""
    return str(ds.get("SOPClassUID", "") or "") == SEGMENTATION_STORAGE


def frame_sources(ds: Dataset) -> list[tuple[str, bool, str]]:
    """Per frame: (0008,1155) source SOP Instance UID ("" when none), whether it names a
    (0008,1160) Referenced Frame Number, and its (0028,135A) Spatial Locations Preserved.

    Read from (5200,9230) Per-frame Functional Groups Sequence -> (0008,9124) Derivation
    Image Sequence -> (0008,2112) Source Image Sequence (first source of each frame).
    """
    out: list[tuple[str, bool, str]] = []
    for item in ds.get("PerFrameFunctionalGroupsSequence") or ():
        found = ("", False, "")
        for derivation in item.get("DerivationImageSequence") or ():
            for source in derivation.get("SourceImageSequence") or ():
                uid = str(source.get("ReferencedSOPInstanceUID", "") or "")
                if uid:
                    preserved = str(source.get("SpatialLocationsPreserved", "") or "").upper()
                    found = (uid, "ReferencedFrameNumber" in source, preserved)
                    break
            if found[0]:
                break
        out.append(found)
    return out


def _check_sources(sources: list[tuple[str, bool, str]]) -> list[str]:
    """The referenced SOP Instance UIDs, in first-reference order, or refuse the file."""
    if not sources or any(not uid for uid, _, _ in sources):
        missing = sum(1 for uid, _, _ in sources if not uid) or 1
        raise _Refused(
            MaskCode.NO_SOURCE_REFERENCE, f"{MaskCode.NO_SOURCE_REFERENCE.text} ({missing} frames)"
        )
    if any(frame for _, frame, _ in sources):
        raise _Refused(MaskCode.MULTI_FRAME_SOURCE)
    if any(preserved in _NOT_PRESERVED for _, _, preserved in sources):
        raise _Refused(MaskCode.SPATIAL_NOT_PRESERVED)
    return list(dict.fromkeys(uid for uid, _, _ in sources))


def _read_masks(
    ds: Dataset, uids: list[str]
) -> tuple[npt.NDArray[np.uint8], tuple[int, ...], tuple[str, ...]]:
    """highdicom: masks ``[images, segments, rows, cols]`` for ``uids``, numbers, labels."""
    import highdicom  # deferred: only nodes with SEG data pay for the import

    seg = highdicom.seg.Segmentation.from_dataset(ds, copy=False)
    numbers = tuple(int(n) for n in seg.segment_numbers)
    labels = tuple(str(seg.get_segment_description(n).segment_label) for n in numbers)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=list(numbers),
        combine_segments=False,
        ignore_spatial_locations=True,  # (0028,135A) checked in _check_sources
        rescale_fractional=True,
        dtype=np.float32,
    )
    masks = (np.moveaxis(np.asarray(pixels), -1, 1) >= 0.5).astype(np.uint8)
    return masks, numbers, labels


def _match_one(
    record: InstanceRecord, images: dict[str, InstanceRecord], noise: PydicomNoise
) -> tuple[list[MatchedMask], MaskReport]:
    with quiet_pydicom() as captured, _quiet_highdicom():
        try:
            ds = pydicom.dcmread(record.path)
            uids = _check_sources(frame_sources(ds))
            present = [uid for uid in uids if uid in images]
            rows, cols = int(ds.Rows), int(ds.Columns)
            fitting = [u for u in present if (images[u].rows, images[u].columns) == (rows, cols)]
            masks, numbers, labels = (
                _read_masks(ds, fitting) if fitting else (np.zeros((0,), np.uint8), (), ())
            )
        except _Refused as refused:
            return [], MaskReport(record.relpath, refused.code, refused.detail)
        except Exception as exc:  # noqa: BLE001 - a bad SEG is reported, never raised
            logger.debug("segmentation unreadable: %s", type(exc).__name__)
            return [], MaskReport(record.relpath, MaskCode.UNREADABLE)
        finally:
            noise.add(captured.kinds())
    matched = [
        MatchedMask(images[uid], masks[i], numbers, labels, record.relpath)
        for i, uid in enumerate(fitting)
    ]
    missing, mismatched = len(uids) - len(present), len(present) - len(fitting)
    if missing:
        code, count = MaskCode.MISSING_IMAGE, missing
    elif mismatched:
        code, count = MaskCode.SHAPE_MISMATCH, mismatched
    else:
        return matched, MaskReport(record.relpath, MaskCode.MATCHED, images_matched=len(matched))
    detail = f"{code.text} ({count} of {len(uids)} referenced images)"
    return matched, MaskReport(record.relpath, code, detail, len(matched))


def _is_seg_record(record: InstanceRecord) -> bool:
    if record.modality.strip().upper() != "SEG":
        return False
    with quiet_pydicom():
        try:
            header = pydicom.dcmread(record.path, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - the scanner read it; treat as not a SEG
            return False
    return is_segmentation(header)


def match_segmentations(records: Iterable[InstanceRecord]) -> SegMatchOutcome:
    """Match every DICOM SEG among ``records`` to the other records. Never raises on bad data.

    Parameters
    ----------
    records : Iterable[InstanceRecord]
        The scanner's usable files (:attr:`client.dicom.scan.ScanOutcome.records`); SEG
        instances ((0008,0060) Modality ``SEG`` with the Segmentation Storage SOP Class)
        are read, all others are candidate images.

    Returns
    -------
    SegMatchOutcome
        The matched masks, one report per SEG file, and the non-SEG records (``images``).
    """
    all_records = list(records)
    segs = [r for r in all_records if _is_seg_record(r)]
    seg_paths = {r.path for r in segs}
    images = tuple(r for r in all_records if r.path not in seg_paths)
    by_uid = {r.sop_instance_uid: r for r in images}
    noise = PydicomNoise()
    matched: list[MatchedMask] = []
    reports: list[MaskReport] = []
    for record in segs:
        found, report = _match_one(record, by_uid, noise)
        matched.extend(found)
        reports.append(report)
    outcome = SegMatchOutcome(tuple(matched), tuple(reports), images)
    counts = {k: n for k, n in outcome.code_counts.items() if n}
    logger.info("segmentations: %d files, %d images matched, %s", len(segs), len(matched), counts)
    noise.log("segmentation matching")
    return outcome


def scan_segmentations(
    data_dir: str | Path, *, require_deidentified: bool = True, decode_pixels: bool = False
) -> tuple[ScanOutcome, SegMatchOutcome]:
    """Scan a folder (:func:`client.dicom.scan.scan_directory`) and match its SEG files.

    Files the scanner skips (e.g. ``phi`` when ``require_deidentified``) are neither images
    nor masks: a SEG whose images were skipped is reported ``missing-image``.
    """
    outcome = scan_directory(
        data_dir, require_deidentified=require_deidentified, decode_pixels=decode_pixels
    )
    return outcome, match_segmentations(outcome.records)
