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
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.pixels import apply_modality_lut

from client.dicom.geometry import numeric_value_problem
from client.dicom.quiet import PydicomNoise, quiet_pydicom
from common.errors import DataError

logger = logging.getLogger(__name__)

try:  # Pillow is pydicom's JPEG / JPEG 2000 plugin here; it is optional
    from PIL.Image import DecompressionBombError, DecompressionBombWarning
except ImportError:  # pragma: no cover - without Pillow no decoder can raise these

    class DecompressionBombError(Exception):  # type: ignore[no-redef]
        """Stand-in when Pillow is not installed."""

    class DecompressionBombWarning(RuntimeWarning):  # type: ignore[no-redef]
        """Stand-in when Pillow is not installed."""


class DecodeCause(str, Enum):
    """Why a file's pixels could not be turned into an image (stable, countable codes)."""

    DECODER_MISSING = "decoder-missing"
    TOO_LARGE = "too-large"
    INVALID_VALUE = "invalid-value"
    NOT_2D = "not-2d"
    NON_FINITE = "non-finite"
    CORRUPT = "corrupt"


_CAUSE_TEXT: dict[DecodeCause, str] = {
    DecodeCause.DECODER_MISSING: (
        "no installed decoder supports this file's (0002,0010) Transfer Syntax UID at its "
        "bit depth; install a decoder plugin (e.g. pylibjpeg) or convert the file"
    ),
    DecodeCause.TOO_LARGE: (
        "the compressed image is larger than the decoder's safety limit (decompression-bomb "
        "guard) or than the memory available"
    ),
    DecodeCause.INVALID_VALUE: "an element needed to decode holds an invalid value",
    DecodeCause.NOT_2D: (
        "the decoded image is not a 2-D greyscale frame of (0028,0010) Rows x "
        "(0028,0011) Columns"
    ),
    DecodeCause.NON_FINITE: (
        "non-finite pixel values after the (0028,1053) Rescale Slope / (0028,1052) Rescale "
        "Intercept are applied"
    ),
    DecodeCause.CORRUPT: (
        "the pixel data is corrupt or inconsistent with the header and the decoder rejected it"
    ),
}


class PixelDecodeError(DataError):
    """A file's pixels could not be decoded; ``cause`` says why (no value, no path).

    The message and ``safe_reason`` are the same fixed sentence, safe on screen and off
    the node.
    """

    def __init__(self, cause: DecodeCause, detail: str = "") -> None:
        sentence = "the pixel data could not be decoded: " + (detail or _CAUSE_TEXT[cause])
        super().__init__(sentence, safe_reason=sentence)
        self.cause = cause


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and len(out) < 8:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def classify_decode_failure(exc: BaseException) -> DecodeCause:
    """Map a decoder exception to a :class:`DecodeCause` (its text is read, never kept)."""
    chain = _chain(exc)
    text = " ".join(str(e) for e in chain).lower()
    too_large = (DecompressionBombError, DecompressionBombWarning, MemoryError)
    if any(isinstance(e, too_large) for e in chain) or "decompression bomb" in text:
        return DecodeCause.TOO_LARGE
    if any(isinstance(e, NotImplementedError) for e in chain) or any(
        needle in text
        for needle in (
            "does not support",
            "not supported",
            "no pixel data decoders",
            "missing required dependencies",
            "no plugins",
            "plugin is not available",
        )
    ):
        return DecodeCause.DECODER_MISSING
    return DecodeCause.CORRUPT


def middle_frame_index(number_of_frames: int) -> int:
    """Index of the frame used for a multi-frame image: ``number_of_frames // 2``."""
    return max(int(number_of_frames), 1) // 2


def read_pixels(
    path: str | Path, *, noise: PydicomNoise | None = None
) -> npt.NDArray[np.float32]:
    """Return the 2-D float32 image of one file with the modality LUT applied.

    pydicom's warnings and log records are captured while reading (see
    :mod:`client.dicom.quiet`); Pillow's decompression-bomb warning is an error here.

    Parameters
    ----------
    path : str | Path
        A file the scanner classified as usable.
    noise : PydicomNoise | None, keyword-only
        Receives the kinds of the pydicom messages captured (counts only).

    Returns
    -------
    numpy.ndarray
        float32 array of shape ((0028,0010) Rows, (0028,0011) Columns).

    Raises
    ------
    PixelDecodeError
        (a :class:`~common.errors.DataError`) The pixels cannot be decoded; its ``cause``
        says why and its message names tags, never values or the path.
    """
    with quiet_pydicom(errors=(DecompressionBombWarning,)) as captured:
        try:
            values, photometric = _decode(path)
        finally:
            if noise is not None:
                noise.add(captured.kinds())
    if photometric == "MONOCHROME1":
        values = (values.max() + values.min() - values).astype(np.float32)
    return values


def _decode(path: str | Path) -> tuple[npt.NDArray[np.float32], str]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data problem
        raise PixelDecodeError(DecodeCause.CORRUPT) from exc
    problem = numeric_value_problem(ds)
    if problem:
        raise PixelDecodeError(DecodeCause.INVALID_VALUE, problem)
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        frames = int(float(str(ds.get("NumberOfFrames", 1) or 1)))
        stored = ds.pixel_array
        if frames > 1:
            stored = stored[middle_frame_index(frames)]
        with np.errstate(over="ignore", invalid="ignore"):
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise PixelDecodeError(classify_decode_failure(exc)) from exc
    if values.shape != (rows, cols):
        raise PixelDecodeError(DecodeCause.NOT_2D)
    if not np.isfinite(values).all():
        # e.g. an absurd (0028,1053) Rescale Slope overflowing float32: one such image would
        # turn every DP-SGD update, and through FedAvg the global model, into NaN.
        raise PixelDecodeError(DecodeCause.NON_FINITE)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    return values, photometric
