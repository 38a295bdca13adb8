"""A node's segmentation data: CT images paired with their lesion masks, split by patient.

An image's mask comes from either of two conventions (:mod:`client.data.segmentation_masks`
pairs them; one folder may hold both):

* a **DICOM Segmentation** object (Segmentation Storage, PS3.3 A.51), read with highdicom by
  :func:`client.dicom.seg.match_segmentations`: each frame labels the image whose
  (0008,0018) SOP Instance UID its (0008,2112) Source Image Sequence names. The mask is
  binary (1 where *any* segment is set) unless ``num_classes > 2`` is asked, when a pixel's
  class is its segment's (0062,0004) Segment Number;
* a **derived mask instance** (see :mod:`client.dicom.synth_seg` for the layout),
  recognised by (0008,0060) Modality :data:`~client.dicom.synth_seg.MASK_MODALITY`
  together with a (0008,1140) Referenced Image Sequence; it labels the image whose
  (0008,0018) SOP Instance UID equals the item's (0008,1155) Referenced SOP Instance UID.

Every other usable instance is an image, and every image needs exactly one mask. A SEG
file that matches no usable image, or cannot be read, is logged with its
:class:`~client.dicom.seg.MaskCode` (never its path) and ignored; its codes are named in
the :class:`~common.errors.DataError` when an image is left without a mask or nothing
usable remains. Images are preprocessed exactly as for classification
(:func:`client.data.transforms.image_transform`); masks are resized with area averaging
and thresholded at one half (per class, then the most covered class, when
``num_classes > 2``), so the mask follows the image's geometry.

Splits are patient-level and reuse :func:`client.data.splits.split_patients`, so a patient
lands in the same split as in the classification loader with the same seed. As there,
the unit of privacy is the patient: :class:`SegmentationPatientDataset` exposes one record per
patient.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import Resize

from client.data.node_data import PerPatientDataset, build_patient_splits, require_data_dir
from client.data.segmentation_masks import MaskSource, pair_images, skipped_summary
from client.data.transforms import image_transform
from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.pixels import read_pixels
from client.dicom.scan import scan_directory
from common.errors import DataError

__all__ = [
    "SegmentationData",
    "SegmentationPatientDataset",
    "SegmentationSplit",
    "load_segmentation_data",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class SegmentationSplit:
    """Images and masks of one split.

    Attributes
    ----------
    images : torch.Tensor
        float32 ``[N, 1, S, S]``.
    masks : torch.Tensor
        uint8 ``[N, S, S]``, 1 for lesion, 0 for background.
    patient_index : torch.Tensor
        int64 ``[N]``: the image's patient within this split (0..num_patients-1, patients
        ordered by (0010,0020) Patient ID).
    num_patients : int
        Patients in the split.
    """

    images: torch.Tensor
    masks: torch.Tensor
    patient_index: torch.Tensor
    num_patients: int

    def __len__(self) -> int:
        """Number of image/mask pairs."""
        return int(self.masks.shape[0])


@dataclass(frozen=True, eq=False)
class SegmentationData:
    """A node's segmentation splits, ``image_size`` and the dataset fingerprint."""

    image_size: int
    fingerprint: str
    train: SegmentationSplit
    val: SegmentationSplit
    test: SegmentationSplit


class SegmentationPatientDataset(PerPatientDataset):
    """One record per patient: ``(image [1, S, S], mask [S, S] int64)`` of a random slice."""

    def __init__(self, split: SegmentationSplit) -> None:
        self.split = split
        super().__init__(split.patient_index, split.num_patients)

    def _item(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[pick], self.split.masks[pick].long()


_Pair = tuple[InstanceRecord, MaskSource]


def _resize_mask(mask: npt.NDArray[np.uint8], image_size: int, num_classes: int) -> torch.Tensor:
    """Area-resize a class map to ``S x S``: threshold one half (binary), or per class
    fraction then the most covered class (``num_classes > 2``)."""
    resize = Resize((image_size, image_size), mode="area")
    if num_classes <= 2:
        resized = resize(torch.as_tensor(mask[None].astype(np.float32)))
        return (torch.as_tensor(resized)[0] >= 0.5).to(torch.uint8)
    onehot = np.stack([mask == k for k in range(num_classes)]).astype(np.float32)
    fractions = torch.as_tensor(resize(torch.as_tensor(onehot)))
    return torch.argmax(fractions, dim=0).to(torch.uint8)


def _build_split(
    patients: tuple[str, ...],
    by_patient: dict[str, list[_Pair]],
    image_size: int,
    num_classes: int,
) -> SegmentationSplit:
    transform = image_transform(image_size)
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    owners: list[int] = []
    for number, pid in enumerate(patients):
        for image_rec, source in by_patient[pid]:
            pixels = read_pixels(image_rec.path)
            mask = source.read(*pixels.shape, num_classes=num_classes)
            images.append(torch.as_tensor(transform(pixels), dtype=torch.float32))
            masks.append(_resize_mask(mask, image_size, num_classes))
            owners.append(number)
    if not images:
        return SegmentationSplit(
            images=torch.zeros((0, 1, image_size, image_size)),
            masks=torch.zeros((0, image_size, image_size), dtype=torch.uint8),
            patient_index=torch.zeros((0,), dtype=torch.int64),
            num_patients=0,
        )
    return SegmentationSplit(
        images=torch.stack(images).contiguous(),
        masks=torch.stack(masks).contiguous(),
        patient_index=torch.tensor(owners, dtype=torch.int64),
        num_patients=len(patients),
    )


def _nothing_usable(skips: tuple[str, str], seg_codes: str) -> DataError:
    local, safe = skips
    seg = f"segmentation files not used: {seg_codes}" if seg_codes else ""
    detail = "; ".join(part for part in (local, seg) if part)
    safe_detail = "; ".join(part for part in (safe, seg) if part)
    return DataError(
        "no usable image/mask pair in the data folder" + (f" ({detail})" if detail else ""),
        safe_reason="the node has no usable segmentation data"
        + (f" ({safe_detail})" if safe_detail else ""),
    )


def load_segmentation_data(
    data_dir: str | Path,
    *,
    image_size: int,
    seed: int = 0,
    require_deidentified: bool = True,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    num_classes: int = 2,
) -> SegmentationData:
    """Scan a node's folder, pair images with masks, split by patient and preprocess.

    Parameters
    ----------
    data_dir : str or Path
        The node's data directory (images, mask series and DICOM SEG files, any layout).
    image_size : int, keyword-only
        Side ``S`` of the preprocessed images and masks.
    seed : int, keyword-only
        Seed of the patient-level split (:func:`client.data.splits.split_patients`).
    require_deidentified : bool, keyword-only
        Skip files that fail the de-identification check (SEG files included).
    val_fraction, test_fraction : float, keyword-only
        Expected proportions of patients in validation and test.
    num_classes : int, keyword-only
        2 (default): masks are 0/1, 1 where any segment is set. Above 2: a DICOM SEG
        pixel's class is its (0062,0004) Segment Number (derived masks stay 0/1).

    Returns
    -------
    SegmentationData
        Train, validation and test splits.

    Raises
    ------
    DataError
        The folder is missing; an image has no mask (the error names how many files the
        scanner skipped, e.g. a truncated mask, and the codes of the SEG files that could
        not be used); a mask is unreadable, has no reference, duplicates another or does
        not match its image's size; or nothing usable is left (the error names the
        scanner's reasons, e.g. "(0010,0010) Patient's Name holds a name", and the SEG
        codes). No error names a path, a UID or a patient value in its ``safe_reason``.
    """
    root = Path(data_dir)
    require_data_dir(root)
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}", safe_reason="bad image size")
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}",
                        safe_reason="bad number of segmentation classes")
    outcome = scan_directory(root, require_deidentified=require_deidentified)
    index = DicomIndex.from_records(outcome.records)
    paired = pair_images(index.instances(), skipped=len(outcome.skipped))
    by_patient: dict[str, list[_Pair]] = {}
    for rec, source in paired.pairs:
        by_patient.setdefault(rec.patient_id, []).append((rec, source))
    if not by_patient:
        raise _nothing_usable(skipped_summary(outcome.skipped), paired.seg_codes)
    arrays = build_patient_splits(
        by_patient,
        lambda patients: _build_split(patients, by_patient, image_size, num_classes),
        root=root,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        what="segmentation data",
        unit="pairs",
    )
    return SegmentationData(
        image_size=image_size,
        fingerprint=index.fingerprint(),
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
    )
