"""What ``vesalius import`` reads from a source: one plan of patients, labels and images.

A reader (:mod:`client.dicom.import_npz` for MedMNIST ``.npz`` files,
:mod:`client.dicom.import_images` for a folder of PNG/JPEG images and a CSV) turns its source
into an :class:`ImportPlan`: every patient's label and image count, known before any pixel is
decoded (so that hospitals can be split and the progress bar sized), and a generator that
decodes the patients' images one patient at a time, in plan order (so that memory holds one
patient, not the collection).

Images are single-sample greyscale (the node reads (0028,0002) Samples per Pixel 1 with
(0028,0004) Photometric Interpretation MONOCHROME2 only): colour is converted with
:func:`to_greyscale`.

Privacy: a plan holds no source identifier (file name, source patient id): patients are
numbered in source order and named by the importer with a pseudonym.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "LUMA_WEIGHTS",
    "ImageKind",
    "ImportPlan",
    "PatientImages",
    "Pixels",
    "to_greyscale",
]

#: Stored pixel arrays: ``(rows, columns)`` of uint8 or uint16.
Pixels = NDArray[np.uint8] | NDArray[np.uint16]

#: ITU-R BT.601 luma weights (R, G, B), the weights Pillow's ``convert("L")`` uses.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)


class ImageKind(str, Enum):
    """The spatial kind of a source's items."""

    IMAGE_2D = "2d"
    VOLUME_3D = "3d"


@dataclass(frozen=True)
class PatientImages:
    """One patient's decoded images, in order.

    Attributes
    ----------
    patient : int
        Zero-based index of the patient in the plan.
    images : tuple of ndarray
        2-D images (``(rows, columns)``, uint8 or uint16); for a volume, its slices along
        the first axis, in order.
    converted_from_colour : int
        How many of them were colour images converted with :func:`to_greyscale`.
    """

    patient: int
    images: tuple[Pixels, ...]
    converted_from_colour: int = 0


@dataclass(frozen=True)
class ImportPlan:
    """A source ready to be written: labels and image counts per patient, and the decoder.

    Attributes
    ----------
    source_kind : str
        ``"npz"`` or ``"images"``.
    kind : ImageKind
        2-D images, or 3-D volumes (one volume per patient, written as a series of slices).
    labels : tuple of int
        The label of each patient (one study per patient), in plan order; integers >= 0.
    images_per_patient : tuple of int
        How many 2-D images (slices, for volumes) each patient has, in plan order.
    decode : callable
        ``decode()`` yields one :class:`PatientImages` per patient, in plan order; it raises
        :class:`common.errors.DataError` for an image that cannot be decoded.
    """

    source_kind: str
    kind: ImageKind
    labels: tuple[int, ...]
    images_per_patient: tuple[int, ...]
    decode: Callable[[], Iterator[PatientImages]]

    @property
    def patients(self) -> int:
        """Number of patients."""
        return len(self.labels)

    @property
    def total_images(self) -> int:
        """Number of 2-D images (DICOM files) the plan will give."""
        return sum(self.images_per_patient)


def to_greyscale(rgb: NDArray[np.generic]) -> tuple[Pixels, bool]:
    """Convert an ``(rows, columns, 3)`` image to one greyscale sample per pixel.

    An image whose three channels are equal (a greyscale image saved as colour) keeps that
    channel unchanged. Any other is converted with the ITU-R BT.601 luma
    ``Y = 0.299 R + 0.587 G + 0.114 B``, rounded to the nearest integer.

    Parameters
    ----------
    rgb : ndarray
        uint8 or uint16 array of shape ``(rows, columns, 3)``.

    Returns
    -------
    tuple of (ndarray, bool)
        The ``(rows, columns)`` image in the input's dtype, and whether colour was converted
        (``False`` when the channels were already equal).
    """
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(red, green) and np.array_equal(red, blue):
        return np.ascontiguousarray(red), False
    weights = np.asarray(LUMA_WEIGHTS, dtype=np.float64)
    luma = np.rint(rgb[..., :3].astype(np.float64) @ weights)
    top = float(np.iinfo(rgb.dtype).max)  # type: ignore[type-var]
    return np.clip(luma, 0.0, top).astype(rgb.dtype), True
