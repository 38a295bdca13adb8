"""What training reads from one DICOM file: its 2-D greyscale frames, or its frames as a volume.

The zoo's models take one input channel (:mod:`client.data.transforms` produces
``[1, S, S]`` images), so every image the node trains on is greyscale:

* **Greyscale, one frame** ((0028,0002) Samples per Pixel 1, (0028,0004) MONOCHROME1 or
  MONOCHROME2, (0028,0008) Number of Frames absent or 1): read by
  :func:`client.dicom.pixels.read_pixels`, exactly as before this module existed, so the
  tensors of a greyscale single-frame folder are bit-identical to the earlier loaders'.
* **Colour** (RGB, YBR_FULL, YBR_FULL_422, YBR_RCT, YBR_ICT, PALETTE COLOR): decoded to RGB
  by :func:`client.dicom.pixels_color.read_frames` and reduced to luma with the ITU-R
  BT.601 weights ``Y = 0.299 R + 0.587 G + 0.114 B`` (Recommendation ITU-R BT.601-7,
  "Studio encoding parameters of digital television for standard 4:3 and wide-screen 16:9
  aspect ratios", 2011, item 3.2; the same weights DICOM uses to define YBR_FULL, PS3.3
  C.7.6.3.1.2). Luma keeps the brightness structure a single-channel model can use; the
  chroma is dropped. Values stay in stored units (0-255 for 8-bit data); the robust
  per-image scaling of :mod:`client.data.transforms` maps them to [0, 1] as for CT.
* **Multi-frame** (Number of Frames > 1), greyscale or colour: every frame, in stored order,
  is one 2-D image (:func:`image_frames`). Before, training read only the middle frame.

Privacy: each frame is one image of the patient's study; the unit of privacy is still the
patient (:class:`client.data.node_data.PatientRecordDataset` draws one image per patient
per record), so more frames per file change nothing in the patient-level DP guarantee.

For volume training (``samples`` "volume-3d" or "series"), :func:`volume_frames` stacks a
multi-frame file's frames along the slice axis, for a study whose single-frame slices do not
assemble into a series (e.g. an enhanced CT or MR image, PS3.3 A.38 / A.36). The frames are
assumed to be parallel slices of one acquisition. They are sorted along the slice normal
when every frame has a (0020,0032) Image Position (Patient) in the (0020,9113) Plane
Position Sequence of the (5200,9230) Per-frame Functional Groups Sequence and one (0020,0037)
Image Orientation (Patient) is known (the (0020,9116) Plane Orientation Sequence of the
(5200,9229) Shared or first per-frame item, or the top-level element); otherwise they stay
in stored order. Spacing is not checked: the volume is resampled to a cube anyway.

Errors are :class:`~client.dicom.pixels.PixelDecodeError` (a
:class:`~common.errors.DataError`) whose message names tags, never values or the path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from client.data.labels import LABELS_FILENAME
from client.dicom.pixels import DecodeCause, PixelDecodeError, read_pixels
from client.dicom.pixels_color import read_frames
from client.dicom.quiet import quiet_pydicom
from client.dicom.scan import ProgressCallback, ScanOutcome, scan_directory

__all__ = [
    "LUMA_WEIGHTS",
    "frame_order",
    "image_frames",
    "luma",
    "scan_for_training",
    "volume_frames",
]

#: ITU-R BT.601 luma weights of R, G and B.
LUMA_WEIGHTS: tuple[float, float, float] = (0.299, 0.587, 0.114)

_GREYSCALE = ("MONOCHROME1", "MONOCHROME2")

Frames = list[npt.NDArray[np.float32]]


def scan_for_training(
    root: Path,
    *,
    require_deidentified: bool,
    progress: ProgressCallback | None = None,
    decode_pixels: bool = False,
) -> ScanOutcome:
    """Scan a node's folder accepting every file training can read (colour included).

    :func:`client.dicom.scan.scan_directory` with ``accept_color=True`` and the labels CSV
    excluded: the scan both loaders run, and the one ``vesalius node check`` should run to
    count the same files as usable.
    """
    return scan_directory(root, require_deidentified=require_deidentified, progress=progress,
                          exclude=(LABELS_FILENAME,), decode_pixels=decode_pixels,
                          accept_color=True)


def luma(rgb: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    """BT.601 luma ``0.299 R + 0.587 G + 0.114 B`` of ``[..., 3]`` RGB values, as float32."""
    r, g, b = LUMA_WEIGHTS
    values = np.asarray(rgb, dtype=np.float64)
    y = r * values[..., 0] + g * values[..., 1] + b * values[..., 2]
    return y.astype(np.float32)


def _header(path: str | Path) -> Dataset:
    with quiet_pydicom():
        try:
            return pydicom.dcmread(path, stop_before_pixels=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure is a data problem
            raise PixelDecodeError(DecodeCause.CORRUPT) from exc


def _frame_count(ds: Dataset) -> int | None:
    """(0028,0008) Number of Frames (1 when absent), or None when it is not a number."""
    value = ds.get("NumberOfFrames", None)
    if value is None or str(value).strip() == "":
        return 1
    try:
        return int(float(str(value)))
    except (TypeError, ValueError):
        return None


def _single_frame_greyscale(ds: Dataset) -> bool:
    """True for what :func:`read_pixels` always read (and for headers it must refuse)."""
    samples = ds.get("SamplesPerPixel", 1)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    try:
        colour = int(samples if samples not in (None, "") else 1) != 1
    except (TypeError, ValueError):
        colour = False
    colour = colour or photometric not in _GREYSCALE
    frames = _frame_count(ds)
    # An unreadable frame count goes to read_pixels, which names the invalid tag.
    return frames is None or (frames <= 1 and not colour)


def _stack(path: str | Path) -> npt.NDArray[np.float32]:
    """Every frame as greyscale ``[frames, rows, cols]`` (luma for colour)."""
    stack = read_frames(path)
    if stack.shape[-1] == 3:
        return luma(stack)
    return np.ascontiguousarray(stack[..., 0], dtype=np.float32)


def image_frames(path: str | Path) -> Frames:
    """Return the 2-D greyscale float32 images training reads from one file.

    Parameters
    ----------
    path : str | Path
        A file the scanner accepted (with ``accept_color=True``).

    Returns
    -------
    list[numpy.ndarray]
        One float32 ``[(0028,0010) Rows, (0028,0011) Columns]`` image per frame, in stored
        order: the :func:`client.dicom.pixels.read_pixels` image of a greyscale single-frame
        file; BT.601 luma of every frame of a colour file; every frame of a greyscale
        multi-frame file (Modality LUT applied, as in
        :func:`client.dicom.pixels_color.read_frames`).

    Raises
    ------
    PixelDecodeError
        The file cannot be read or decoded (the message names tags, never values).
    """
    if _single_frame_greyscale(_header(path)):
        return [read_pixels(path)]
    return list(_stack(path))


def _floats(item: Dataset | None, keyword: str, count: int) -> tuple[float, ...] | None:
    if item is None:
        return None
    value = item.get(keyword, None)
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        return None
    return numbers


def _first(groups: Sequence[Dataset] | None, index: int, keyword: str) -> Dataset | None:
    """Item 0 of sequence ``keyword`` in ``groups[index]``, or None."""
    if not groups or index >= len(groups):
        return None
    seq = groups[index].get(keyword, None)
    return seq[0] if seq else None


def _orientation(ds: Dataset) -> tuple[float, ...] | None:
    shared = ds.get("SharedFunctionalGroupsSequence", None)
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    for item in (_first(shared, 0, "PlaneOrientationSequence"),
                 _first(per_frame, 0, "PlaneOrientationSequence"), ds):
        found = _floats(item, "ImageOrientationPatient", 6)
        if found is not None:
            return found
    return None


def frame_order(ds: Dataset, frames: int) -> list[int] | None:
    """Frame indices sorted along the slice normal, or None to keep the stored order.

    The normal is ``r x c`` of (0020,0037) Image Orientation (Patient) (see the module
    docstring for where it is read); each frame's projection is ``n . p`` with ``p`` its
    (0020,0032) Image Position (Patient) from the (0020,9113) Plane Position Sequence of its
    (5200,9230) Per-frame Functional Groups item. The sort is stable.

    Returns
    -------
    list[int] | None
        None when the per-frame items do not number ``frames``, or any position or the
        orientation is missing or not six/three finite numbers.
    """
    per_frame = ds.get("PerFrameFunctionalGroupsSequence", None)
    orientation = _orientation(ds)
    if not per_frame or len(per_frame) != frames or orientation is None:
        return None
    normal = np.cross(np.array(orientation[:3]), np.array(orientation[3:]))
    if not np.linalg.norm(normal) > 0:
        return None
    projections: list[float] = []
    for index in range(frames):
        position = _floats(_first(per_frame, index, "PlanePositionSequence"),
                           "ImagePositionPatient", 3)
        if position is None:
            return None
        projections.append(float(np.dot(normal, np.array(position))))
    return [int(i) for i in np.argsort(np.array(projections), kind="stable")]


def volume_frames(path: str | Path) -> npt.NDArray[np.float32]:
    """Return a multi-frame file's frames as one greyscale volume ``[frames, rows, cols]``.

    Colour frames are reduced to luma as in :func:`image_frames`; the frames are sorted by
    :func:`frame_order` when the file says where each lies, else kept in stored order.

    Raises
    ------
    PixelDecodeError
        The file cannot be decoded, or it holds fewer than two frames.
    """
    header = _header(path)
    stack = _stack(path)
    if stack.shape[0] < 2:
        raise PixelDecodeError(DecodeCause.NOT_2D,
                               "a volume needs (0028,0008) Number of Frames of at least 2")
    order = frame_order(header, stack.shape[0])
    if order is not None:
        stack = stack[order]
    return np.ascontiguousarray(stack, dtype=np.float32)
