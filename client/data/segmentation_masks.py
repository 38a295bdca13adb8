"""Which mask labels each image: a derived mask instance or the frames of a DICOM SEG.

Two mask conventions are read, side by side in one data folder:

* **DICOM Segmentation** (Segmentation Storage, PS3.3 A.51): read and matched to its
  source images by :func:`client.dicom.seg.match_segmentations` (highdicom), frame by
  frame through (0008,9124) Derivation Image Sequence -> (0008,2112) Source Image
  Sequence -> (0008,1155) Referenced SOP Instance UID. Each SEG file gets a
  :class:`~client.dicom.seg.MaskCode`.
* **Derived mask instances**, the project's own convention (:mod:`client.dicom.synth_seg`):
  single-frame instances with (0008,0060) Modality :data:`~client.dicom.synth_seg.
  MASK_MODALITY` and a (0008,1140) Referenced Image Sequence whose first item's
  (0008,1155) Referenced SOP Instance UID is the labelled image's (0008,0018).

Mask values (:meth:`MaskSource.read`):

* binary (``num_classes == 2``, the default): 1 where *any* segment of the SEG is set
  (or the derived mask is non-zero), 0 elsewhere;
* ``num_classes > 2``: a SEG pixel's class is the (0062,0004) Segment Number of the segment
  that covers it (the highest number where segments overlap), 0 for background; a segment
  number ``>= num_classes`` is refused. Derived masks stay 0/1.

Every error here is a :class:`~common.errors.DataError` whose ``safe_reason`` names codes
and counts only, never a path, a UID or a patient value.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom

from client.dicom.index import InstanceRecord
from client.dicom.reasons import SkippedFile
from client.dicom.seg import MaskCode, MaskReport, MatchedMask, match_segmentations
from client.dicom.synth_seg import MASK_MODALITY
from common.errors import DataError

__all__ = ["MaskSource", "PairedImages", "pair_images", "skipped_summary"]

logger = logging.getLogger(__name__)

_SAFE_MASK_REASON = "a lesion mask is missing or unreadable"


def _mask_error(message: str, seg_codes: str = "") -> DataError:
    suffix = f" (segmentation files not used: {seg_codes})" if seg_codes else ""
    return DataError(message + suffix, safe_reason=_SAFE_MASK_REASON + suffix)


def _code_counts(codes: Iterable[str]) -> str:
    """``"code-a: 2, code-b: 1"`` (most common first); empty when there is none."""
    return ", ".join(f"{code}: {n}" for code, n in Counter(codes).most_common())


def skipped_summary(skipped: Sequence[SkippedFile]) -> tuple[str, str]:
    """The scanner's skips as (local sentence, safe sentence); both empty when none.

    The local sentence adds each distinct reason's fixed text (tags, never values, e.g.
    "(0010,0010) Patient's Name holds a name"); neither names a file.
    """
    if not skipped:
        return "", ""
    counts = _code_counts(s.code.value for s in skipped)
    texts = "; ".join(dict.fromkeys(s.text for s in skipped))
    safe = f"the scanner skipped {len(skipped)} file(s) ({counts})"
    return f"{safe}: {texts}", safe


@dataclass(frozen=True, eq=False)
class MaskSource:
    """The mask of one image: a derived mask instance (decoded on demand) or SEG frames.

    Attributes
    ----------
    derived : InstanceRecord or None
        A derived mask instance (Modality :data:`~client.dicom.synth_seg.MASK_MODALITY`).
    seg : MatchedMask or None
        The image's masks from one DICOM SEG file.
    """

    derived: InstanceRecord | None = None
    seg: MatchedMask | None = None

    def read(self, rows: int, cols: int, *, num_classes: int = 2) -> npt.NDArray[np.uint8]:
        """uint8 ``[rows, cols]`` class map (see the module docstring for the values).

        Raises
        ------
        DataError
            The mask cannot be decoded, does not have the image's (0028,0010) Rows x
            (0028,0011) Columns, or (``num_classes > 2``) names a segment number that is
            not a class.
        """
        if self.seg is not None:
            pixels = self._seg_classes(num_classes)
        else:
            pixels = self._derived_pixels()
        if pixels.shape != (rows, cols):
            raise _mask_error(f"a mask has shape {pixels.shape}, its image has {(rows, cols)}")
        return pixels

    def _derived_pixels(self) -> npt.NDArray[np.uint8]:
        assert self.derived is not None
        try:
            pixels = np.asarray(pydicom.dcmread(self.derived.path).pixel_array)
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
            raise _mask_error(
                f"cannot decode a mask ({type(exc).__name__}); `vesalius node check` lists "
                "the files"
            ) from exc
        return (pixels > 0).astype(np.uint8)

    def _seg_classes(self, num_classes: int) -> npt.NDArray[np.uint8]:
        assert self.seg is not None
        masks, numbers = self.seg.masks, self.seg.segment_numbers
        if num_classes <= 2:
            return masks.any(axis=0).astype(np.uint8)
        if max(numbers, default=0) >= num_classes:
            raise DataError(
                f"a segmentation has (0062,0004) Segment Number {max(numbers)}, but only "
                f"classes 0..{num_classes - 1} are trained (num_classes {num_classes})",
                safe_reason="a segmentation has more segments than the task has classes",
            )
        out = np.zeros(masks.shape[1:], dtype=np.uint8)
        for number, mask in sorted(zip(numbers, masks), key=lambda item: item[0]):
            out[mask > 0] = number
        return out


@dataclass(frozen=True, eq=False)
class PairedImages:
    """Every usable image with its mask, and the SEG files that were not fully used.

    Attributes
    ----------
    pairs : tuple[tuple[InstanceRecord, MaskSource], ...]
        Each image and its mask, in the scanner's order.
    seg_problems : tuple[MaskReport, ...]
        Reports of SEG files whose code is not ``matched`` (local; paths never logged).
    seg_files : int
        DICOM SEG files read.
    """

    pairs: tuple[tuple[InstanceRecord, MaskSource], ...]
    seg_problems: tuple[MaskReport, ...]
    seg_files: int

    @property
    def seg_codes(self) -> str:
        """Code counts of :attr:`seg_problems` (``"missing-image: 1"``); empty when none."""
        return _code_counts(r.code.value for r in self.seg_problems)


def _referenced_uid(ds: pydicom.Dataset) -> str | None:
    seq = ds.get("ReferencedImageSequence")
    if not seq:
        return None
    return str(seq[0].get("ReferencedSOPInstanceUID", "") or "") or None


def _derived_masks(records: Iterable[InstanceRecord]) -> dict[str, InstanceRecord]:
    """Image SOP Instance UID -> its derived mask instance."""
    masks: dict[str, InstanceRecord] = {}
    for rec in records:
        try:
            header = pydicom.dcmread(rec.path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - the scanner read it; any failure is data
            raise _mask_error(
                f"cannot read a mask header ({type(exc).__name__}); `vesalius node check` "
                "lists the files"
            ) from exc
        target = _referenced_uid(header)
        if target is None:
            raise _mask_error(
                "a mask has no (0008,1140) Referenced Image Sequence item with a "
                "(0008,1155) Referenced SOP Instance UID; cannot tell which image it labels"
            )
        if target in masks:
            raise _mask_error(
                "an image has two masks (two mask instances reference the same SOP Instance UID)"
            )
        masks[target] = rec
    return masks


def _seg_masks(matched: Iterable[MatchedMask]) -> dict[str, MatchedMask]:
    """Image SOP Instance UID -> its SEG masks; an image in two SEG files is refused."""
    out: dict[str, MatchedMask] = {}
    for match in matched:
        uid = match.image.sop_instance_uid
        if uid in out:
            raise _mask_error(
                "an image is labelled by two DICOM SEG files (frames of both reference its "
                "SOP Instance UID); keep one segmentation per image"
            )
        out[uid] = match
    return out


def _log_seg_problems(problems: Sequence[MaskReport]) -> None:
    for report in problems:  # the file is never named: a file name can identify
        logger.warning("a segmentation file was not fully used [%s]: %s (%d image(s) matched)",
                       report.code.value, report.text, report.images_matched)


def pair_images(records: Iterable[InstanceRecord], *, skipped: int) -> PairedImages:
    """Pair every usable image with its derived mask or its DICOM SEG frames.

    Parameters
    ----------
    records : Iterable[InstanceRecord]
        The scanner's usable files (:attr:`client.dicom.scan.ScanOutcome.records`).
    skipped : int, keyword-only
        Files the scanner skipped (named, as a count, in the error for an unmasked image).

    Returns
    -------
    PairedImages
        The pairs; masks that label no usable image are logged (with their code for a SEG)
        and ignored, as for derived masks.

    Raises
    ------
    DataError
        An image has no mask (the message counts the scanner's skips and the codes of the
        SEG files that could not be used); an image has two masks; a derived mask has no
        reference or an unreadable header.
    """
    outcome = match_segmentations(records)  # never raises on bad SEG data
    problems = tuple(r for r in outcome.reports if r.code is not MaskCode.MATCHED)
    _log_seg_problems(problems)
    seg_codes = _code_counts(r.code.value for r in problems)
    images = [r for r in outcome.images if r.modality.strip().upper() != MASK_MODALITY]
    derived = _derived_masks(
        r for r in outcome.images if r.modality.strip().upper() == MASK_MODALITY
    )
    from_seg = _seg_masks(outcome.matched)
    known = {rec.sop_instance_uid for rec in images}
    orphans = sum(1 for target in derived if target not in known)
    if orphans:
        logger.warning("%d mask(s) reference no usable image; ignored", orphans)
    pairs: list[tuple[InstanceRecord, MaskSource]] = []
    for rec in images:
        uid = rec.sop_instance_uid
        if uid in derived and uid in from_seg:
            raise _mask_error(
                "an image has two masks (a derived mask instance and a DICOM SEG frame)"
            )
        if uid in derived:
            pairs.append((rec, MaskSource(derived=derived[uid])))
        elif uid in from_seg:
            pairs.append((rec, MaskSource(seg=from_seg[uid])))
        else:
            raise _mask_error(
                "an image has no lesion mask: no usable mask instance or DICOM SEG frame "
                f"references its SOP Instance UID ({skipped} file(s) in the data folder were "
                "skipped by the scanner, e.g. truncated or not DICOM; see `vesalius node check`)",
                seg_codes,
            )
    return PairedImages(tuple(pairs), problems, len(outcome.reports))
