"""3-D volumes from DICOM series: slice order, spacing, orientation, checks per series.

Files are grouped by (0020,000E) Series Instance UID; files whose (0020,000E) is empty
(some exports blank it) are grouped by (0020,0052) Frame of Reference UID instead, and the
report says so (``grouped_by``); files with neither are counted as unreadable. Within a series the slices are
sorted along the slice normal ``n = r x c``, the cross product of the row direction cosine
``r`` (first three values of (0020,0037) Image Orientation (Patient)) and the column
direction cosine ``c`` (last three), by the projection ``n . p`` of each slice's
(0020,0032) Image Position (Patient) ``p``: the (0020,0013) Instance Number is not trusted
for geometry. The slice spacing is the median step between sorted projections.

A series assembles only when every check holds; otherwise it gets one
:class:`SeriesReport` with a :class:`SeriesCode` and a sentence naming tags and counts,
never a value, UID or path. The checks, in order: one frame per file; at least two slices;
(0020,0037), (0020,0032) and (0028,0030) Pixel Spacing present and valid in every file;
one (0028,0010) Rows x (0028,0011) Columns, one pixel spacing and one orientation;
no two slices at the same position; slice positions along the normal (a gantry-tilted
acquisition drifts sideways and would be sheared); no gap (a step above
``gap_factor`` x the median step, 1.5 by default); a relative spread of the steps,
``(max - min) / median``, at most ``spacing_tolerance``.

Array convention. ``Volume.array[k, i, j]`` is slice ``k`` (along ``n``), row ``i`` (along
``c``), column ``j`` (along ``r``); its centre lies at
``origin + k * dz * n + i * dy * c + j * dx * r`` in patient coordinates (LPS, mm), with
``(dz, dy, dx) = spacing``: ``dz`` the slice step, ``dy`` and ``dx`` the first (between
rows) and second (between columns) values of (0028,0030) Pixel Spacing. ``direction`` holds
``n, c, r`` as columns; ``affine`` is the 4x4 index-to-patient matrix MONAI expects.

Pixels go through :func:`client.dicom.pixels.read_pixels` (Modality LUT applied, so CT is
in Hounsfield units). De-identification is the scanner's job: pass files it accepted.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset

from client.dicom.pixels import PixelDecodeError, read_pixels
from client.dicom.quiet import PydicomNoise, quiet_pydicom

logger = logging.getLogger(__name__)

#: Steps shorter than this (mm) are the same position.
DUPLICATE_STEP_MM = 1e-3
#: Direction cosines differing by more than this are different orientations.
ORIENTATION_TOLERANCE = 1e-3
#: Pixel spacings differing by more than this fraction are different.
PIXEL_SPACING_TOLERANCE = 1e-3
_DEFER_SIZE_BYTES = 1024
SERIES_TAG = "(0020,000E)"
FRAME_OF_REFERENCE_TAG = "(0020,0052)"


class SeriesCode(str, Enum):
    """Stable codes for the outcome of assembling one series."""

    ASSEMBLED = "assembled"
    MULTI_FRAME = "multi-frame"
    TOO_FEW_SLICES = "too-few-slices"
    MISSING_ORIENTATION = "missing-orientation"
    MISSING_POSITION = "missing-position"
    MISSING_PIXEL_SPACING = "missing-pixel-spacing"
    MIXED_SHAPE = "mixed-shape"
    MIXED_PIXEL_SPACING = "mixed-pixel-spacing"
    MIXED_ORIENTATION = "mixed-orientation"
    DUPLICATE_POSITION = "duplicate-position"
    NOT_ALONG_NORMAL = "not-along-normal"
    GAP = "gap"
    INCONSISTENT_SPACING = "inconsistent-spacing"
    UNDECODABLE = "undecodable"

    @property
    def text(self) -> str:
        """The fixed human sentence for this code."""
        return SERIES_TEXT[self]


SERIES_TEXT: dict[SeriesCode, str] = {
    SeriesCode.ASSEMBLED: "the series was assembled into one volume",
    SeriesCode.MULTI_FRAME: (
        "a file of the series has (0028,0008) Number of Frames above 1; a series volume is "
        "built from single-frame slices"
    ),
    SeriesCode.TOO_FEW_SLICES: "the series has fewer than two slices, so no slice spacing",
    SeriesCode.MISSING_ORIENTATION: (
        "(0020,0037) Image Orientation (Patient) is missing or not two orthogonal unit vectors"
    ),
    SeriesCode.MISSING_POSITION: "(0020,0032) Image Position (Patient) is missing or invalid",
    SeriesCode.MISSING_PIXEL_SPACING: "(0028,0030) Pixel Spacing is missing or not positive",
    SeriesCode.MIXED_SHAPE: "the slices differ in (0028,0010) Rows or (0028,0011) Columns",
    SeriesCode.MIXED_PIXEL_SPACING: "the slices differ in (0028,0030) Pixel Spacing",
    SeriesCode.MIXED_ORIENTATION: (
        "the slices differ in (0020,0037) Image Orientation (Patient)"
    ),
    SeriesCode.DUPLICATE_POSITION: (
        "two or more slices share one (0020,0032) Image Position (Patient)"
    ),
    SeriesCode.NOT_ALONG_NORMAL: (
        "the (0020,0032) Image Position (Patient) values drift across the image plane "
        "(e.g. gantry tilt), so stacking the slices would shear the volume"
    ),
    SeriesCode.GAP: "the slice positions have a gap (a missing slice)",
    SeriesCode.INCONSISTENT_SPACING: "the steps between slice positions are not uniform",
    SeriesCode.UNDECODABLE: "the pixel data of a slice could not be decoded",
}


@dataclass(frozen=True)
class SeriesReport:
    """The outcome for one series.

    Attributes
    ----------
    group_uid : str
        (0020,000E) Series Instance UID of the series, or its (0020,0052) Frame of
        Reference UID when (0020,000E) is empty. Local use only: never logged, never in
        ``text`` or :meth:`to_dict`.
    code : SeriesCode
        The stable outcome code.
    slices : int
        Files in the series.
    detail : str
        A sentence with tags and counts only; ``code.text`` when empty.
    grouped_by : str
        The tag that grouped the files: ``"(0020,000E)"`` or ``"(0020,0052)"``.
    """

    group_uid: str
    code: SeriesCode
    slices: int
    detail: str = ""
    grouped_by: str = SERIES_TAG

    @property
    def ok(self) -> bool:
        """``True`` when the series was assembled."""
        return self.code is SeriesCode.ASSEMBLED

    @property
    def text(self) -> str:
        """Human sentence (tags and counts, never values)."""
        return self.detail or self.code.text

    def to_dict(self) -> dict[str, object]:
        """JSON-ready ``{"code", "text", "slices", "grouped_by"}`` (no UID)."""
        return {
            "code": self.code.value,
            "text": self.text,
            "slices": self.slices,
            "grouped_by": self.grouped_by,
        }


@dataclass(frozen=True)
class SliceHeader:
    """The header values of one file that volume assembly uses.

    ``series_instance_uid`` is (0020,000E), ``frame_of_reference_uid`` (0020,0052) (either
    may be empty, not both).
    ``position`` is (0020,0032) Image Position (Patient), ``orientation`` (0020,0037) Image
    Orientation (Patient) and ``pixel_spacing`` (0028,0030) Pixel Spacing (row, column
    spacing in mm); each ``None`` when missing or invalid.
    """

    path: Path
    series_instance_uid: str
    frame_of_reference_uid: str
    sop_instance_uid: str
    rows: int
    columns: int
    frames: int
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    pixel_spacing: tuple[float, float] | None


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        items = [float(v) for v in (value if isinstance(value, Sequence) and not
                                    isinstance(value, str) else [value])]
    except (TypeError, ValueError):
        return None
    if len(items) != count or not all(math.isfinite(v) for v in items):
        return None
    return tuple(items)


def _valid_orientation(values: tuple[float, ...] | None) -> bool:
    if values is None:
        return False
    row, col = np.array(values[:3]), np.array(values[3:])
    unit = abs(np.linalg.norm(row) - 1) < 1e-2 and abs(np.linalg.norm(col) - 1) < 1e-2
    return bool(unit and abs(float(row @ col)) < 1e-2)


def header_from_dataset(ds: Dataset, path: Path) -> SliceHeader | None:
    """Extract a :class:`SliceHeader`.

    ``None`` without valid (0028,0010) Rows / (0028,0011) Columns, or when both (0020,000E)
    Series Instance UID and (0020,0052) Frame of Reference UID are empty.
    """
    try:
        series = str(ds.get("SeriesInstanceUID", "") or "").strip()
        frame_of_reference = str(ds.get("FrameOfReferenceUID", "") or "").strip()
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(float(str(ds.get("NumberOfFrames", 1) or 1)))
    except (TypeError, ValueError):
        return None
    if not (series or frame_of_reference) or rows < 1 or cols < 1:
        return None
    orientation = _floats(ds, "ImageOrientationPatient", 6)
    spacing = _floats(ds, "PixelSpacing", 2)
    if spacing is not None and min(spacing) <= 0:
        spacing = None
    return SliceHeader(
        path=path,
        series_instance_uid=series,
        frame_of_reference_uid=frame_of_reference,
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        rows=rows,
        columns=cols,
        frames=max(frames, 1),
        position=_floats(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
        orientation=orientation if _valid_orientation(orientation) else None,  # type: ignore[arg-type]
        pixel_spacing=spacing,  # type: ignore[arg-type]
    )


def read_slice_header(path: str | Path, *, noise: PydicomNoise | None = None) -> SliceHeader | None:
    """Read one file's header (pixel data deferred); ``None`` when unreadable. Never raises."""
    with quiet_pydicom() as captured:
        try:
            ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE_BYTES)
            return header_from_dataset(ds, Path(path))
        except Exception:  # noqa: BLE001 - an unreadable file is counted, never raised
            return None
        finally:
            if noise is not None:
                noise.add(captured.kinds())


@dataclass(frozen=True, eq=False)
class SeriesGeometry:
    """A series that passed every check: sorted slices and the voxel grid.

    Attributes
    ----------
    group_uid : str
        (0020,000E), or (0020,0052) when that is empty (local use only).
    slices : tuple[SliceHeader, ...]
        Sorted by projection on the slice normal, ascending.
    spacing : tuple[float, float, float]
        ``(dz, dy, dx)`` in mm: median slice step, then (0028,0030) Pixel Spacing.
    direction : numpy.ndarray
        3x3, columns ``n, c, r`` (slice normal, column and row direction cosines).
    origin : numpy.ndarray
        (0020,0032) Image Position (Patient) of the first sorted slice, mm.
    """

    group_uid: str
    slices: tuple[SliceHeader, ...]
    spacing: tuple[float, float, float]
    direction: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(k, i, j, 1)`` to patient coordinates (mm)."""
        return _affine(self.direction, self.spacing, self.origin)


def _affine(
    direction: npt.NDArray[np.float64],
    spacing: tuple[float, float, float],
    origin: npt.NDArray[np.float64],
) -> npt.NDArray[np.float64]:
    out = np.eye(4)
    out[:3, :3] = direction * np.asarray(spacing)[None, :]
    out[:3, 3] = origin
    return out


def _count_sentence(count: int, total: int, code: SeriesCode) -> str:
    return f"{code.text} ({count} of {total} slices)"


def _first_problem(slices: Sequence[SliceHeader]) -> tuple[SeriesCode, str] | None:
    """Per-slice and consistency checks before sorting (see the module docstring)."""
    total = len(slices)
    multi = sum(1 for s in slices if s.frames > 1)
    if multi:
        return SeriesCode.MULTI_FRAME, _count_sentence(multi, total, SeriesCode.MULTI_FRAME)
    if total < 2:
        return SeriesCode.TOO_FEW_SLICES, ""
    for code, missing in (
        (SeriesCode.MISSING_ORIENTATION, sum(1 for s in slices if s.orientation is None)),
        (SeriesCode.MISSING_POSITION, sum(1 for s in slices if s.position is None)),
        (SeriesCode.MISSING_PIXEL_SPACING, sum(1 for s in slices if s.pixel_spacing is None)),
    ):
        if missing:
            return code, _count_sentence(missing, total, code)
    if len({(s.rows, s.columns) for s in slices}) > 1:
        return SeriesCode.MIXED_SHAPE, ""
    spacings = np.array([s.pixel_spacing for s in slices], dtype=np.float64)
    if np.any(np.abs(spacings - spacings[0]) > PIXEL_SPACING_TOLERANCE * spacings[0]):
        return SeriesCode.MIXED_PIXEL_SPACING, ""
    cosines = np.array([s.orientation for s in slices], dtype=np.float64)
    common = Counter(tuple(np.round(c, 3)) for c in cosines).most_common(1)[0][0]
    away = np.abs(cosines - np.array(common)) > ORIENTATION_TOLERANCE + 5e-4
    differing = int(np.sum(np.any(away, axis=1)))
    if differing:
        return SeriesCode.MIXED_ORIENTATION, _count_sentence(
            differing, total, SeriesCode.MIXED_ORIENTATION
        )
    return None


def _step_problem(
    positions: npt.NDArray[np.float64],
    normal: npt.NDArray[np.float64],
    pixel_spacing: tuple[float, float],
    *,
    gap_factor: float,
    spacing_tolerance: float,
) -> tuple[SeriesCode, str] | None:
    """Checks on the sorted positions: duplicates, sideways drift, gaps, uniformity."""
    steps = np.diff(positions @ normal)
    duplicates = int(np.sum(steps < DUPLICATE_STEP_MM))
    if duplicates:
        return SeriesCode.DUPLICATE_POSITION, (
            f"{SeriesCode.DUPLICATE_POSITION.text} ({duplicates} repeated positions)"
        )
    offsets = positions - positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    if float(np.linalg.norm(in_plane, axis=1).max()) > 0.5 * min(pixel_spacing):
        return SeriesCode.NOT_ALONG_NORMAL, (
            f"{SeriesCode.NOT_ALONG_NORMAL.text} (drift above half of (0028,0030) Pixel Spacing)"
        )
    median = float(np.median(steps))
    gaps = int(np.sum(steps > gap_factor * median))
    if gaps:
        return SeriesCode.GAP, (
            f"{SeriesCode.GAP.text}: {gaps} step(s) above {gap_factor:g} times the median step"
        )
    spread = float((steps.max() - steps.min()) / median)
    if spread > spacing_tolerance:
        return SeriesCode.INCONSISTENT_SPACING, (
            f"{SeriesCode.INCONSISTENT_SPACING.text}: relative spread above the tolerance "
            f"of {spacing_tolerance:g}"
        )
    return None


def plan_series(
    slices: Sequence[SliceHeader],
    *,
    gap_factor: float = 1.5,
    spacing_tolerance: float = 0.01,
) -> SeriesGeometry | SeriesReport:
    """Sort one series' slices and compute its voxel grid, or say why it cannot be.

    Parameters
    ----------
    slices : Sequence[SliceHeader]
        Headers of one (0020,000E) Series Instance UID, in any order.
    gap_factor : float, keyword-only
        A step above ``gap_factor`` x the median step is a gap (code ``gap``).
    spacing_tolerance : float, keyword-only
        Largest accepted ``(max step - min step) / median step`` (code
        ``inconsistent-spacing``).

    Returns
    -------
    SeriesGeometry | SeriesReport
        The grid, or the report naming the first failed check (tags and counts only).
    """
    if gap_factor <= 1 or spacing_tolerance < 0:
        raise ValueError("gap_factor must be > 1 and spacing_tolerance >= 0")
    uid, tag = group_key(slices[0]) if slices else ("", SERIES_TAG)
    problem = _first_problem(slices)
    if problem is not None:
        return SeriesReport(uid, problem[0], len(slices), problem[1], tag)
    cosines = np.array(slices[0].orientation, dtype=np.float64)
    row, col = cosines[:3], cosines[3:]
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    positions = np.array([s.position for s in slices], dtype=np.float64)
    order = np.argsort(positions @ normal, kind="stable")
    positions = positions[order]
    pixel = slices[0].pixel_spacing or (1.0, 1.0)
    problem = _step_problem(
        positions, normal, pixel, gap_factor=gap_factor, spacing_tolerance=spacing_tolerance
    )
    if problem is not None:
        return SeriesReport(uid, problem[0], len(slices), problem[1], tag)
    return SeriesGeometry(
        group_uid=uid,
        slices=tuple(slices[i] for i in order),
        spacing=(float(np.median(np.diff(positions @ normal))), pixel[0], pixel[1]),
        direction=np.column_stack([normal, col, row]),
        origin=positions[0].copy(),
    )


@dataclass(frozen=True, eq=False)
class Volume:
    """A 3-D image in modality units with its place in patient space.

    Attributes
    ----------
    array : numpy.ndarray
        float32 ``[slices, rows, cols]``.
    spacing : tuple[float, float, float]
        ``(dz, dy, dx)`` voxel size in mm.
    direction : numpy.ndarray
        3x3, columns: patient-space directions of array axes 0, 1, 2.
    origin : numpy.ndarray
        Patient position (mm) of the centre of voxel ``(0, 0, 0)``.
    group_uid : str
        (0020,000E), or (0020,0052) when that is empty (local use only).
    sop_instance_uids : tuple[str, ...]
        (0008,0018) of each slice in array order; empty after resampling.
    """

    array: npt.NDArray[np.float32]
    spacing: tuple[float, float, float]
    direction: npt.NDArray[np.float64]
    origin: npt.NDArray[np.float64]
    group_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()

    @property
    def affine(self) -> npt.NDArray[np.float64]:
        """4x4 matrix mapping ``(k, i, j, 1)`` to patient coordinates (mm)."""
        return _affine(self.direction, self.spacing, self.origin)


def load_volume(geometry: SeriesGeometry, *, noise: PydicomNoise | None = None) -> Volume:
    """Decode the sorted slices of a planned series into a :class:`Volume`.

    Raises
    ------
    client.dicom.pixels.PixelDecodeError
        A slice cannot be decoded (message names tags, never values or the path).
    """
    planes = [read_pixels(s.path, noise=noise) for s in geometry.slices]
    return Volume(
        array=np.stack(planes).astype(np.float32, copy=False),
        spacing=geometry.spacing,
        direction=geometry.direction,
        origin=geometry.origin,
        group_uid=geometry.group_uid,
        sop_instance_uids=tuple(s.sop_instance_uid for s in geometry.slices),
    )


@dataclass(frozen=True, eq=False)
class VolumeOutcome:
    """Result of :func:`assemble_volumes`: volumes, one report per series, unreadable files."""

    volumes: tuple[Volume, ...]
    series: tuple[SeriesReport, ...]
    unreadable_files: int = 0

    @property
    def code_counts(self) -> dict[str, int]:
        """Series per outcome code (every code listed)."""
        counts = Counter(r.code.value for r in self.series)
        return {code.value: counts.get(code.value, 0) for code in SeriesCode}


def group_key(header: SliceHeader) -> tuple[str, str]:
    """``(uid, tag)``: (0020,000E), or (0020,0052) when (0020,000E) is empty."""
    if header.series_instance_uid:
        return header.series_instance_uid, SERIES_TAG
    return header.frame_of_reference_uid, FRAME_OF_REFERENCE_TAG


def group_series(headers: Iterable[SliceHeader]) -> dict[tuple[str, str], list[SliceHeader]]:
    """Group headers by :func:`group_key` (sorted by key)."""
    groups: dict[tuple[str, str], list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[group_key(header)].append(header)
    return dict(sorted(groups.items()))


def assemble_volumes(
    paths: Iterable[str | Path],
    *,
    gap_factor: float = 1.5,
    spacing_tolerance: float = 0.01,
    decode: bool = True,
) -> VolumeOutcome:
    """Group files into series, check each and build the volumes. Never raises on bad data.

    Parameters
    ----------
    paths : Iterable[str | Path]
        DICOM files (e.g. the scanner's usable records' paths).
    gap_factor, spacing_tolerance : float, keyword-only
        See :func:`plan_series`.
    decode : bool, keyword-only
        Decode the pixels; ``False`` checks the headers only (``volumes`` is then empty and
        passing series are reported ``assembled``).

    Returns
    -------
    VolumeOutcome
        One :class:`SeriesReport` per series; one :class:`Volume` per assembled series.
    """
    noise = PydicomNoise()
    headers: list[SliceHeader] = []
    unreadable = 0
    for path in paths:
        header = read_slice_header(path, noise=noise)
        if header is None:
            unreadable += 1
        else:
            headers.append(header)
    volumes: list[Volume] = []
    reports: list[SeriesReport] = []
    for (uid, tag), slices in group_series(headers).items():
        planned = plan_series(slices, gap_factor=gap_factor, spacing_tolerance=spacing_tolerance)
        if isinstance(planned, SeriesReport):
            reports.append(planned)
            continue
        if decode:
            try:
                volumes.append(load_volume(planned, noise=noise))
            except PixelDecodeError as exc:
                reports.append(
                    SeriesReport(uid, SeriesCode.UNDECODABLE, len(slices), str(exc), tag)
                )
                continue
            except Exception as exc:  # noqa: BLE001 - never raise on bad data
                logger.debug("volume assembly failed: %s", type(exc).__name__)
                reports.append(SeriesReport(uid, SeriesCode.UNDECODABLE, len(slices), "", tag))
                continue
        reports.append(SeriesReport(uid, SeriesCode.ASSEMBLED, len(slices), "", tag))
    outcome = VolumeOutcome(tuple(volumes), tuple(reports), unreadable)
    counts = {k: n for k, n in outcome.code_counts.items() if n}
    logger.info(
        "series: %d checked, %s; %d unreadable files", len(reports), counts, unreadable
    )
    noise.log("volume assembly")
    return outcome
