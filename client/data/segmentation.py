"""A node's segmentation data: CT images paired with their lesion masks, split by patient.

Masks are single-frame DICOM instances (see :mod:`client.dicom.synth_seg` for the layout)
recognised by (0008,0060) Modality :data:`~client.dicom.synth_seg.MASK_MODALITY` together
with a (0008,1140) Referenced Image Sequence; each mask is paired with the image whose
(0008,0018) SOP Instance UID equals the item's (0008,1155) Referenced SOP Instance UID.
Every other usable instance is an image. Images are preprocessed exactly as for
classification (:func:`client.data.transforms.image_transform`); masks are resized with
area averaging and thresholded at one half, so the mask follows the image's geometry.

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
import pydicom
import torch
from monai.transforms import Resize

from client.data.node_data import PerPatientDataset, build_patient_splits, require_data_dir
from client.data.transforms import image_transform
from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.pixels import read_pixels
from client.dicom.scan import scan_directory
from client.dicom.synth_seg import MASK_MODALITY
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


def _mask_error(message: str) -> DataError:
    return DataError(message, safe_reason="a lesion mask is missing or unreadable")


def _referenced_uid(ds: pydicom.Dataset) -> str | None:
    seq = ds.get("ReferencedImageSequence")
    if not seq:
        return None
    return str(seq[0].get("ReferencedSOPInstanceUID", "") or "") or None


def _pair_masks(index: DicomIndex) -> tuple[list[InstanceRecord], dict[str, InstanceRecord]]:
    """Split records into images and masks; return (images, image SOP UID -> mask)."""
    images: list[InstanceRecord] = []
    masks: dict[str, InstanceRecord] = {}
    for rec in index.instances():
        if rec.modality.strip().upper() != MASK_MODALITY:
            images.append(rec)
            continue
        try:
            header = pydicom.dcmread(rec.path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - the scanner read it; any failure is data
            raise _mask_error(f"cannot read a mask header ({type(exc).__name__}); `vesalius node check` lists the files") from exc
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
    known = {rec.sop_instance_uid for rec in images}
    for target, rec in masks.items():
        if target not in known:
            logger.warning("a mask references no usable image; ignored")
    return images, masks


def _read_mask(rec: InstanceRecord, rows: int, cols: int) -> npt.NDArray[np.uint8]:
    try:
        pixels = np.asarray(pydicom.dcmread(rec.path).pixel_array)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise _mask_error(
            f"cannot decode a mask ({type(exc).__name__}); `vesalius node check` lists the files"
        ) from exc
    if pixels.shape != (rows, cols):
        raise _mask_error(
            f"a mask has shape {pixels.shape}, its image has {(rows, cols)}"
        )
    return (pixels > 0).astype(np.uint8)


def _resize_mask(mask: npt.NDArray[np.uint8], image_size: int) -> torch.Tensor:
    resized = Resize((image_size, image_size), mode="area")(
        torch.as_tensor(mask[None].astype(np.float32)))
    return (torch.as_tensor(resized)[0] >= 0.5).to(torch.uint8)


def _build_split(
    patients: tuple[str, ...],
    by_patient: dict[str, list[tuple[InstanceRecord, InstanceRecord]]],
    image_size: int,
) -> SegmentationSplit:
    transform = image_transform(image_size)
    images: list[torch.Tensor] = []
    masks: list[torch.Tensor] = []
    owners: list[int] = []
    for number, pid in enumerate(patients):
        for image_rec, mask_rec in by_patient[pid]:
            pixels = read_pixels(image_rec.path)
            mask = _read_mask(mask_rec, *pixels.shape)
            images.append(torch.as_tensor(transform(pixels), dtype=torch.float32))
            masks.append(_resize_mask(mask, image_size))
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


def load_segmentation_data(
    data_dir: str | Path,
    *,
    image_size: int,
    seed: int = 0,
    require_deidentified: bool = True,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> SegmentationData:
    """Scan a node's folder, pair images with masks, split by patient and preprocess.

    Parameters
    ----------
    data_dir : str or Path
        The node's data directory (images and mask series, any folder layout).
    image_size : int, keyword-only
        Side ``S`` of the preprocessed images and masks.
    seed : int, keyword-only
        Seed of the patient-level split (:func:`client.data.splits.split_patients`).
    require_deidentified : bool, keyword-only
        Skip files that fail the de-identification check.
    val_fraction, test_fraction : float, keyword-only
        Expected proportions of patients in validation and test.

    Returns
    -------
    SegmentationData
        Train, validation and test splits.

    Raises
    ------
    DataError
        The folder is missing; an image has no mask (the error names it and how many files
        the scanner skipped, e.g. a truncated mask); a mask is unreadable, has no reference,
        duplicates another or does not match its image's size; or nothing usable is left.
    """
    root = Path(data_dir)
    require_data_dir(root)
    if image_size < 1:
        raise DataError(f"image_size must be >= 1, got {image_size}", safe_reason="bad image size")
    outcome = scan_directory(root, require_deidentified=require_deidentified)
    index = DicomIndex.from_records(outcome.records)
    images, masks = _pair_masks(index)
    by_patient: dict[str, list[tuple[InstanceRecord, InstanceRecord]]] = {}
    for rec in images:
        mask = masks.get(rec.sop_instance_uid)
        if mask is None:
            raise _mask_error(
                "an image has no lesion mask: no usable mask instance references "
                f"its SOP Instance UID ({len(outcome.skipped)} file(s) in the data folder were "
                "skipped by the scanner, e.g. truncated or not DICOM; see `vesalius node check`)"
            )
        by_patient.setdefault(rec.patient_id, []).append((rec, mask))
    if not by_patient:
        raise DataError(
            "no usable image/mask pair in the data folder",
            safe_reason="the node has no usable segmentation data",
        )
    arrays = build_patient_splits(
        by_patient,
        lambda patients: _build_split(patients, by_patient, image_size),
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
