"""Read one DICOM file's pixels as float32 in modality units.

The stored values are converted with the Modality LUT (PS3.3 C.11.1):
``value = stored * (0028,1053) Rescale Slope + (0028,1052) Rescale Intercept`` (or a
(0028,3000) Modality LUT Sequence when present), via
:func:`pydicom.pixels.apply_modality_lut`. For CT this gives Hounsfield units.

Multi-frame images ((0028,0008) Number of Frames > 1) contribute their *middle* frame,
index ``frames // 2``: one representative 2-D slice per file, so that one file is one
image whatever its frame count.

(0028,0004) Photometric Interpretation MONOCHROME1 (minimum = white) is inverted after the
LUT (``max + min - value``) so that, as for MONOCHROME2, larger values are brighter.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels import apply_modality_lut

from common.errors import DataError

logger = logging.getLogger(__name__)


def middle_frame_index(number_of_frames: int) -> int:
    """Index of the frame used for a multi-frame image: ``number_of_frames // 2``."""
    return max(int(number_of_frames), 1) // 2


def read_pixels(path: str | Path) -> npt.NDArray[np.float32]:
    """Return the 2-D float32 image of one file with the modality LUT applied.

    Parameters
    ----------
    path : str | Path
        A file the scanner classified as usable.

    Returns
    -------
    numpy.ndarray
        float32 array of shape ((0028,0010) Rows, (0028,0011) Columns).

    Raises
    ------
    DataError
        The pixel data cannot be decoded or is not a single-sample greyscale image.
    """
    try:
        ds = pydicom.dcmread(path)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            stored = ds.pixel_array[middle_frame_index(frames)]
        else:
            stored = ds.pixel_array
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise DataError(
            f"cannot decode pixel data of {path}: {type(exc).__name__}: {exc}",
            safe_reason="a DICOM image could not be decoded",
        ) from exc
    if values.ndim != 2:
        raise DataError(
            f"{path}: expected a 2-D greyscale frame, got shape {values.shape}",
            safe_reason="a DICOM image is not a 2-D greyscale image",
        )
    if not np.isfinite(values).all():
        # e.g. an absurd (0028,1053) Rescale Slope overflowing float32: one such image would
        # turn every DP-SGD update, and through FedAvg the global model, into NaN.
        raise DataError(
            f"{path}: non-finite values after the modality LUT",
            safe_reason="a DICOM image has non-finite pixel values after rescaling",
        )
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        values = (values.max() + values.min() - values).astype(np.float32)
    return values
