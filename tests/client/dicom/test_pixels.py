"""Pixels as float32 with the modality LUT; middle frame of multi-frame images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from client.dicom.pixels import middle_frame_index, read_pixels
from common.errors import DataError
from tests.client.dicom._factory import copy_testdata, make_dataset, write_dataset, write_image


def test_modality_lut_slope_and_intercept(tmp_path: Path) -> None:
    # Prepare
    stored = np.arange(16 * 16, dtype=np.uint16).reshape(16, 16)
    write_image(tmp_path / "a.dcm", pixels=stored, slope=2.0, intercept=-100.0)
    # Execute
    values = read_pixels(tmp_path / "a.dcm")
    # Assert
    assert values.dtype == np.float32
    assert values.shape == (16, 16)
    np.testing.assert_allclose(values, stored.astype(np.float32) * 2.0 - 100.0)


def test_multiframe_takes_middle_frame(tmp_path: Path) -> None:
    # Prepare: 3 frames filled with 10, 20, 30
    frames = np.stack([np.full((4, 5), v, dtype=np.uint16) for v in (10, 20, 30)])
    ds = make_dataset(pixels=frames[0])
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype("<u2").tobytes()
    write_dataset(ds, tmp_path / "mf.dcm")
    # Execute
    values = read_pixels(tmp_path / "mf.dcm")
    # Assert
    assert middle_frame_index(3) == 1 and middle_frame_index(4) == 2
    assert values.shape == (4, 5)
    assert np.all(values == 20.0)


def test_monochrome1_is_inverted(tmp_path: Path) -> None:
    # Prepare
    stored = np.array([[0, 10], [20, 30]], dtype=np.uint16)
    ds = make_dataset(pixels=stored)
    ds.PhotometricInterpretation = "MONOCHROME1"
    write_dataset(ds, tmp_path / "m1.dcm")
    # Execute
    values = read_pixels(tmp_path / "m1.dcm")
    # Assert
    np.testing.assert_array_equal(values, np.array([[30, 20], [10, 0]], dtype=np.float32))


def test_bundled_ct_in_hounsfield_units(tmp_path: Path) -> None:
    # Prepare: CT_small.dcm has (0028,1052) Rescale Intercept -1024, slope 1
    path = copy_testdata("CT_small.dcm", tmp_path / "ct.dcm")
    # Execute
    values = read_pixels(path)
    # Assert
    assert values.shape == (128, 128)
    assert values.dtype == np.float32
    assert float(values.min()) < 0.0


def test_undecodable_pixels_raise_data_error_without_path(tmp_path: Path) -> None:
    # Prepare
    path = copy_testdata("JPEG-LL.dcm", tmp_path / "jpeg-ll.dcm")  # no JPEG Lossless decoder
    # Execute
    with pytest.raises(DataError) as info:
        read_pixels(path)
    # Assert
    assert str(tmp_path) not in info.value.safe_reason


def test_non_finite_values_after_the_lut_are_refused(tmp_path: Path) -> None:
    # A Rescale Slope of 1e38 overflows float32 for stored values above ~3.4
    stored = np.full((8, 8), 1000, dtype=np.uint16)
    write_image(tmp_path / "huge.dcm", pixels=stored, slope=1e38, intercept=0.0)
    with pytest.raises(DataError) as info:
        read_pixels(tmp_path / "huge.dcm")
    assert "non-finite" in info.value.safe_reason and "huge" not in info.value.safe_reason
