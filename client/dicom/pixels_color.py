"""Read every frame of a DICOM image, greyscale or colour, as ``[frames, rows, cols, channels]``.

:func:`client.dicom.pixels.read_pixels` gives training's 2-D greyscale path one slice per
file. :func:`read_frames` gives the task layer the whole stack:

* **Frames.** All (0028,0008) Number of Frames frames, in stored order (1 when absent).
* **Greyscale** (MONOCHROME1/2, one channel): the Modality LUT (PS3.3 C.11.1) is applied per
  frame. Enhanced multi-frame objects carry (0028,1053) Rescale Slope and (0028,1052)
  Rescale Intercept in the (0028,9145) Pixel Value Transformation Sequence of the
  (5200,9229) Shared or (5200,9230) Per-frame Functional Groups Sequence (PS3.3 C.7.6.16.2.9),
  which :func:`pydicom.pixels.apply_modality_lut` does not read; they are applied here, a
  per-frame value overriding the shared one. MONOCHROME1 is inverted over the whole stack
  (``max + min - value``) so that larger values are brighter, as in ``read_pixels``.
* **Colour** (three channels, RGB order): (0028,0004) Photometric Interpretation RGB as
  stored; YBR_FULL and YBR_FULL_422 converted to RGB by pydicom's decoder (``raw=False``) or,
  if it left them, by :func:`pydicom.pixels.convert_color_space`; YBR_RCT / YBR_ICT (JPEG 2000)
  converted by the JPEG 2000 decoder itself; PALETTE COLOR mapped through its (0028,1201)-
  (0028,1203) lookup tables by :func:`pydicom.pixels.apply_color_lut`. No Modality LUT is
  applied to colour data (PS3.3 C.7.6.16.2.9 defines rescaling for greyscale only).

Values are float32 and finite. Errors are :class:`~client.dicom.pixels.PixelDecodeError`,
whose sentence names tags, never values or the path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, convert_color_space, get_decoder
from pydicom.uid import UID

from client.dicom.geometry import PALETTE_COLOR, Geometry, read_geometry
from client.dicom.pixels import (
    DecodeCause,
    DecompressionBombWarning,
    PixelDecodeError,
    classify_decode_failure,
)
from client.dicom.quiet import PydicomNoise, quiet_pydicom
from client.dicom.reasons import Skip

_YBR_CONVERTIBLE = ("YBR_FULL", "YBR_FULL_422")


def frame_rescale(ds: Dataset, frames: int) -> list[tuple[float, float]] | None:
    """Per-frame ``(slope, intercept)`` from the functional groups, or ``None``.

    Reads (0028,1053) Rescale Slope and (0028,1052) Rescale Intercept from the (0028,9145)
    Pixel Value Transformation Sequence of (5200,9229) Shared Functional Groups Sequence,
    overridden per frame by (5200,9230) Per-frame Functional Groups Sequence (PS3.3
    C.7.6.16.2.9). ``None`` when neither holds one: the top-level Modality LUT applies.

    Raises
    ------
    ValueError
        A slope or intercept is not a finite number, or the per-frame sequence does not
        have one item per frame.
    """
    shared = _transform(ds.get("SharedFunctionalGroupsSequence"), 0)
    per_frame_seq = ds.get("PerFrameFunctionalGroupsSequence")
    per_frame = [_transform(per_frame_seq, i) for i in range(len(per_frame_seq or ()))]
    if shared is None and all(item is None for item in per_frame):
        return None
    if per_frame and len(per_frame) != frames:
        raise ValueError("per-frame functional groups do not match the number of frames")
    default = shared if shared is not None else (1.0, 0.0)
    if not per_frame:
        return [default] * frames
    return [item if item is not None else default for item in per_frame]


def _transform(groups: Sequence[Dataset] | None, index: int) -> tuple[float, float] | None:
    if not groups or index >= len(groups):
        return None
    seq = groups[index].get("PixelValueTransformationSequence")
    if not seq:
        return None
    item = seq[0]
    if "RescaleSlope" not in item and "RescaleIntercept" not in item:
        return None
    slope = float(item.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(item.get("RescaleIntercept", 0.0) or 0.0)
    if not (np.isfinite(slope) and np.isfinite(intercept)):
        raise ValueError("non-finite rescale in the functional groups")
    return slope, intercept


def _as_stack(arr: npt.NDArray[np.generic], frames: int, color: bool) -> npt.NDArray[np.generic]:
    """Reshape a decoder output to ``[frames, rows, cols, samples]``."""
    if frames == 1:
        arr = arr[None]
    if not color:
        arr = arr[..., None]
    return arr


def _greyscale(
    stored: npt.NDArray[np.generic], ds: Dataset, frames: int, photometric: str
) -> npt.NDArray[np.float32]:
    rescale = frame_rescale(ds, frames)
    with np.errstate(over="ignore", invalid="ignore"):
        if rescale is None:
            values = np.asarray(apply_modality_lut(stored[..., 0], ds), dtype=np.float64)
        else:
            slopes = np.array([s for s, _ in rescale], dtype=np.float64)[:, None, None]
            intercepts = np.array([i for _, i in rescale], dtype=np.float64)[:, None, None]
            values = stored[..., 0].astype(np.float64) * slopes + intercepts
        if photometric == "MONOCHROME1" and values.size:
            values = values.max() + values.min() - values
        return values.astype(np.float32)[..., None]


def _color(
    decoded: npt.NDArray[np.generic], ds: Dataset, decoded_photometric: str
) -> npt.NDArray[np.float32]:
    if decoded_photometric == PALETTE_COLOR:
        rgb = apply_color_lut(decoded[..., 0], ds)
    elif decoded_photometric in _YBR_CONVERTIBLE:
        rgb = convert_color_space(decoded, decoded_photometric, "RGB", per_frame=True)
    else:
        rgb = decoded
    return np.asarray(rgb, dtype=np.float32)


def _decode(path: str | Path) -> npt.NDArray[np.float32]:
    try:
        ds = pydicom.dcmread(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure is a data problem
        raise PixelDecodeError(DecodeCause.CORRUPT) from exc
    try:
        geometry: Geometry = read_geometry(ds, accept_color=True)
    except Skip as skip:
        raise PixelDecodeError(DecodeCause.INVALID_VALUE, skip.detail or skip.code.text) from None
    frames, rows, cols = geometry.frames, geometry.rows, geometry.columns
    try:
        decoder = get_decoder(UID(str(ds.file_meta.get("TransferSyntaxUID", ""))))
        if not decoder.is_available:
            raise PixelDecodeError(DecodeCause.DECODER_MISSING)
        decoded, meta = decoder.as_array(ds, raw=False)
        decoded_photometric = str(meta.get("photometric_interpretation", geometry.photometric))
        stack = _as_stack(decoded, frames, geometry.samples == 3)
        if geometry.is_color:
            values = _color(stack, ds, decoded_photometric)
        else:
            values = _greyscale(stack, ds, frames, geometry.photometric)
    except PixelDecodeError:
        raise
    except ValueError as exc:
        if "functional groups" in str(exc):
            raise PixelDecodeError(
                DecodeCause.INVALID_VALUE,
                "(0028,9145) Pixel Value Transformation Sequence holds an invalid rescale "
                "or does not match (0028,0008) Number of Frames",
            ) from exc
        raise PixelDecodeError(classify_decode_failure(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - any decoder failure is a data problem
        raise PixelDecodeError(classify_decode_failure(exc)) from exc
    channels = 3 if geometry.is_color else 1
    if values.shape != (frames, rows, cols, channels):
        raise PixelDecodeError(
            DecodeCause.NOT_2D,
            "the decoded image is not (0028,0008) Number of Frames x (0028,0010) Rows x "
            "(0028,0011) Columns x the channels of (0028,0004) Photometric Interpretation",
        )
    if not np.isfinite(values).all():
        raise PixelDecodeError(DecodeCause.NON_FINITE)
    return values


def read_frames(
    path: str | Path, *, noise: PydicomNoise | None = None
) -> npt.NDArray[np.float32]:
    """Return every frame of one file as float32 ``[frames, rows, cols, channels]``.

    Parameters
    ----------
    path : str | Path
        A DICOM Part 10 file with (7FE0,0010) Pixel Data.
    noise : PydicomNoise | None, keyword-only
        Receives the kinds of the pydicom messages captured (counts only).

    Returns
    -------
    numpy.ndarray
        float32 of shape ((0028,0008) Number of Frames, (0028,0010) Rows, (0028,0011)
        Columns, channels): one channel in modality units for MONOCHROME1/2, three (R, G, B)
        in stored units for colour images.

    Raises
    ------
    PixelDecodeError
        (a :class:`~common.errors.DataError`) The pixels cannot be decoded or the image is
        not a supported greyscale or colour image; the message names tags, never values or
        the path.
    """
    with quiet_pydicom(errors=(DecompressionBombWarning,)) as captured:
        try:
            return _decode(path)
        finally:
            if noise is not None:
                noise.add(captured.kinds())
