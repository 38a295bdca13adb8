"""3-D volume assembly from series (sorting, spacing, checks per series) and MONAI resampling."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.uid import generate_uid

from client.dicom.resample import resample_volume
from client.dicom.volume import SeriesCode, Volume, assemble_volumes
from tests.client.dicom._factory import make_dataset, write_dataset

REAL_SERIES = "dicom/totalsegmentator_example_ct_dicom"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _write_slice(
    path: Path,
    *,
    series: str,
    position: Sequence[float] | None,
    orientation: Sequence[float] | None = AXIAL,
    value: int = 0,
    shape: tuple[int, int] = (6, 8),
    pixel_spacing: Sequence[float] = (0.5, 0.75),
    instance_number: int = 1,
) -> Path:
    """One single-frame CT slice whose pixels all hold ``value``."""
    ds = make_dataset(
        series_uid=series,
        instance_number=instance_number,
        pixels=np.full(shape, value, dtype=np.uint16),
        intercept=-1000.0,
    )
    if position is not None:
        ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    if orientation is not None:
        ds.ImageOrientationPatient = [f"{v:.8f}" for v in orientation]
    ds.PixelSpacing = list(pixel_spacing)
    return write_dataset(ds, path)


def _write_series(
    folder: Path,
    positions: Sequence[Sequence[float] | None],
    *,
    orientation: Sequence[float] = AXIAL,
    shuffle_seed: int | None = 0,
    edit: Callable[[int], dict[str, object]] | None = None,
) -> list[Path]:
    """Slice k holds value 100 + k at ``positions[k]``; files written in shuffled order."""
    series = generate_uid()
    order = list(range(len(positions)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    paths = []
    for number, k in enumerate(order):
        kwargs: dict[str, object] = {"orientation": orientation}
        kwargs.update(edit(k) if edit else {})
        paths.append(
            _write_slice(
                folder / f"s{number:02d}.dcm",
                series=series,
                position=positions[k],
                value=100 + k,
                instance_number=number + 1,  # deliberately unrelated to the geometry
                **kwargs,  # type: ignore[arg-type]
            )
        )
    return paths


def _line(origin: Sequence[float], normal: Sequence[float], steps: Sequence[float]) -> list[
    list[float]
]:
    return [list(np.asarray(origin) + s * np.asarray(normal)) for s in steps]


def _only_report(paths: Sequence[Path]) -> tuple[SeriesCode, str]:
    outcome = assemble_volumes(paths)
    assert len(outcome.series) == 1
    return outcome.series[0].code, outcome.series[0].text


def test_shuffled_axial_series_is_sorted_by_position(tmp_path: Path) -> None:
    # Prepare: 5 slices 2.5 mm apart along +z, written in shuffled order
    positions = _line((-10.0, 20.0, 30.0), (0, 0, 1), [2.5 * k for k in range(5)])
    paths = _write_series(tmp_path, positions)
    # Execute
    outcome = assemble_volumes(paths)
    # Assert
    assert [r.code for r in outcome.series] == [SeriesCode.ASSEMBLED]
    volume = outcome.volumes[0]
    assert volume.array.shape == (5, 6, 8)
    np.testing.assert_array_equal(volume.array[:, 0, 0], [100 - 1000 + k for k in range(5)])
    np.testing.assert_allclose(volume.spacing, (2.5, 0.5, 0.75))
    np.testing.assert_allclose(volume.origin, (-10.0, 20.0, 30.0))
    np.testing.assert_allclose(volume.direction, np.eye(3)[:, ::-1])


def test_tilted_orientation_sorts_along_the_cross_product(tmp_path: Path) -> None:
    # Prepare: an oblique plane, 30 degrees about x, slices 1.25 mm apart along its normal
    angle = np.deg2rad(30.0)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(angle), np.sin(angle)])
    normal = np.cross(row, col)
    positions = _line((5.0, -5.0, 0.0), normal, [1.25 * k for k in range(4)])
    paths = _write_series(tmp_path, positions, orientation=[*row, *col], shuffle_seed=3)
    # Execute
    outcome = assemble_volumes(paths)
    # Assert
    volume = outcome.volumes[0]
    np.testing.assert_array_equal(volume.array[:, 0, 0], [-900.0, -899.0, -898.0, -897.0])
    np.testing.assert_allclose(volume.spacing[0], 1.25, rtol=1e-5)
    np.testing.assert_allclose(volume.direction, np.column_stack([normal, col, row]), atol=1e-7)
    # voxel (k, i, j) lies at origin + k dz n + i dy c + j dx r: check the last corner
    corner = volume.affine @ np.array([3, 5, 7, 1.0])
    expected = positions[0] + 3 * 1.25 * normal + 5 * 0.5 * col + 7 * 0.75 * row
    np.testing.assert_allclose(corner[:3], expected, atol=1e-4)


@pytest.mark.parametrize(
    ("steps", "code"),
    [
        ([0.0, 2.0, 4.0, 8.0, 10.0], SeriesCode.GAP),
        ([0.0, 2.0, 2.0, 4.0, 6.0], SeriesCode.DUPLICATE_POSITION),
        ([0.0, 2.0, 4.0, 6.4, 8.4], SeriesCode.INCONSISTENT_SPACING),
    ],
)
def test_position_problems_are_reported_with_their_code(
    tmp_path: Path, steps: list[float], code: SeriesCode
) -> None:
    # Prepare
    paths = _write_series(tmp_path, _line((0, 0, 0), (0, 0, 1), steps))
    # Execute
    found, text = _only_report(paths)
    # Assert
    assert found is code
    assert "(0020,0032)" in text or "step" in text


def test_mixed_orientations_are_refused_naming_the_tag_and_count(tmp_path: Path) -> None:
    # Prepare: the third slice is sagittal
    positions = _line((0, 0, 0), (0, 0, 1), [0.0, 1.0, 2.0, 3.0])
    sagittal = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    paths = _write_series(
        tmp_path, positions, edit=lambda k: {"orientation": sagittal} if k == 2 else {}
    )
    # Execute
    code, text = _only_report(paths)
    # Assert
    assert code is SeriesCode.MIXED_ORIENTATION
    assert "(0020,0037)" in text and "1 of 4 slices" in text


@pytest.mark.parametrize(
    ("edit", "code", "tag"),
    [
        (lambda k: {"orientation": None} if k == 1 else {}, SeriesCode.MISSING_ORIENTATION,
         "(0020,0037)"),
        (lambda k: {"shape": (6, 6)} if k == 0 else {}, SeriesCode.MIXED_SHAPE, "(0028,0010)"),
        (lambda k: {"pixel_spacing": (0.6, 0.75)} if k == 3 else {},
         SeriesCode.MIXED_PIXEL_SPACING, "(0028,0030)"),
    ],
)
def test_header_inconsistencies_are_refused(
    tmp_path: Path, edit: Callable[[int], dict[str, object]], code: SeriesCode, tag: str
) -> None:
    # Prepare
    paths = _write_series(tmp_path, _line((0, 0, 0), (0, 0, 1), [0.0, 1.0, 2.0, 3.0]), edit=edit)
    # Execute
    found, text = _only_report(paths)
    # Assert
    assert found is code
    assert tag in text


def test_missing_position_is_counted(tmp_path: Path) -> None:
    # Prepare
    positions: list[list[float] | None] = list(_line((0, 0, 0), (0, 0, 1), [0.0, 1.0, 2.0]))
    positions[1] = None
    paths = _write_series(tmp_path, positions)
    # Execute
    code, text = _only_report(paths)
    # Assert
    assert code is SeriesCode.MISSING_POSITION
    assert "(0020,0032)" in text and "1 of 3 slices" in text


def test_gantry_tilt_drift_is_refused(tmp_path: Path) -> None:
    # Prepare: axial orientation but positions step 2 mm in z and 0.35 mm in y (10 degrees)
    positions = [[0.0, 0.35 * k, 2.0 * k] for k in range(6)]
    paths = _write_series(tmp_path, positions)
    # Execute
    code, _ = _only_report(paths)
    # Assert
    assert code is SeriesCode.NOT_ALONG_NORMAL


def test_reports_name_no_uid_and_bad_files_never_raise(tmp_path: Path) -> None:
    # Prepare: two series (one fine, one with a gap) plus a junk file
    good = _write_series(tmp_path / "a", _line((0, 0, 0), (0, 0, 1), [0.0, 1.0, 2.0]))
    gap = _write_series(tmp_path / "b", _line((0, 0, 0), (0, 0, 1), [0.0, 1.0, 5.0, 6.0]))
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 200)
    uids = {pydicom.dcmread(p).SeriesInstanceUID for p in good + gap}
    # Execute
    outcome = assemble_volumes([*good, *gap, junk])
    # Assert
    assert outcome.unreadable_files == 1
    assert sorted(r.code.value for r in outcome.series) == ["assembled", "gap"]
    assert outcome.code_counts["gap"] == 1 and outcome.code_counts["assembled"] == 1
    rendered = repr([r.to_dict() for r in outcome.series])
    assert not any(uid in rendered for uid in uids)
    assert str(tmp_path) not in rendered


def _real_series(shared_file: Callable[[str], Path]) -> list[Path]:
    licence = shared_file(f"{REAL_SERIES}/LICENSE_TotalSegmentator_Apache-2.0.txt")
    return sorted(p for p in licence.parent.iterdir() if p.name.startswith("CT."))


def test_real_jpeg2000_ct_series_assembles_with_header_geometry(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare: expected geometry computed here from the headers, independently
    paths = _real_series(shared_file)
    headers = [pydicom.dcmread(p) for p in paths]
    cosines = np.array(headers[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    headers.sort(key=lambda ds: float(np.dot(normal, np.array(ds.ImagePositionPatient, float))))
    along = [float(np.dot(normal, np.array(ds.ImagePositionPatient, float))) for ds in headers]
    row_spacing, col_spacing = (float(v) for v in headers[0].PixelSpacing)
    expected_first = headers[0].pixel_array * float(headers[0].RescaleSlope) + float(
        headers[0].RescaleIntercept
    )
    # Execute
    outcome = assemble_volumes(paths)
    # Assert
    assert len(paths) == 20
    assert [r.code for r in outcome.series] == [SeriesCode.ASSEMBLED]
    volume = outcome.volumes[0]
    assert volume.array.shape == (20, int(headers[0].Rows), int(headers[0].Columns))
    np.testing.assert_allclose(volume.spacing, (along[1] - along[0], row_spacing, col_spacing))
    assert volume.spacing[0] == pytest.approx(2.0)
    np.testing.assert_allclose(volume.origin, np.array(headers[0].ImagePositionPatient, float))
    np.testing.assert_allclose(volume.direction[:, 0], normal)
    np.testing.assert_allclose(volume.direction[:, 2], cosines[:3])
    np.testing.assert_array_equal(volume.array[0], expected_first.astype(np.float32))
    assert volume.sop_instance_uids[-1] == headers[-1].SOPInstanceUID


def _extent(volume: Volume) -> npt.NDArray[np.float64]:
    return (np.array(volume.array.shape) - 1) * np.array(volume.spacing)


def test_real_series_resamples_to_spacing_and_shape(shared_file: Callable[[str], Path]) -> None:
    # Prepare
    volume = assemble_volumes(_real_series(shared_file)).volumes[0]
    # Execute
    iso = resample_volume(volume, spacing_mm=(2.0, 2.0, 2.0))
    small = resample_volume(volume, shape=(10, 128, 128))
    same = resample_volume(volume, spacing_mm=volume.spacing)
    # Assert: new voxel size, same orientation and origin, same physical extent (+- a voxel)
    np.testing.assert_allclose(iso.spacing, (2.0, 2.0, 2.0))
    np.testing.assert_allclose(iso.direction, volume.direction, atol=1e-9)
    np.testing.assert_allclose(iso.origin, volume.origin, atol=1e-6)
    assert np.all(np.abs(_extent(iso) - _extent(volume)) <= 2.0)
    assert small.array.shape == (10, 128, 128)
    np.testing.assert_allclose(
        small.spacing, np.array(volume.spacing) * np.array(volume.array.shape) / (10, 128, 128)
    )
    np.testing.assert_allclose(same.array, volume.array, atol=1e-3)
    assert iso.array.dtype == np.float32
    assert float(iso.array.mean()) == pytest.approx(float(volume.array.mean()), rel=0.05)


def test_resample_nearest_keeps_label_values(tmp_path: Path) -> None:
    # Prepare: a binary volume
    mask = np.zeros((4, 8, 8), dtype=np.float32)
    mask[1:3, 2:6, 2:6] = 1.0
    volume = Volume(mask, (2.0, 1.0, 1.0), np.eye(3), np.zeros(3))
    # Execute
    out = resample_volume(volume, spacing_mm=(1.0, 1.0, 1.0), interpolation="nearest")
    # Assert
    assert set(np.unique(out.array)) <= {0.0, 1.0}
    assert out.array.shape[0] == 7


def test_resample_needs_exactly_one_target() -> None:
    # Prepare
    volume = Volume(np.zeros((2, 2, 2), np.float32), (1.0, 1.0, 1.0), np.eye(3), np.zeros(3))
    # Execute / Assert
    with pytest.raises(ValueError, match="exactly one"):
        resample_volume(volume)
    with pytest.raises(ValueError, match="positive"):
        resample_volume(volume, spacing_mm=(1.0, 0.0, 1.0))
