"""Colour and multi-frame reading (read_frames) and the scanner's accept_color option."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian

from client.dicom.index import InstanceRecord
from client.dicom.pixels import DecodeCause, PixelDecodeError
from client.dicom.pixels_color import frame_rescale, read_frames
from client.dicom.reasons import SkipCode, SkippedFile
from client.dicom.scan import classify_file, scan_directory
from tests.client.dicom._factory import make_dataset, write_dataset


def _color_dataset(samples: npt.NDArray[np.uint8], photometric: str, frames: int = 1) -> Dataset:
    """A de-identified 8-bit, 3-sample dataset holding ``samples`` [frames?, rows, cols, 3]."""
    ds = make_dataset(pixels=np.zeros(samples.shape[-3:-1], dtype=np.uint16))
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = photometric
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.RescaleSlope, ds.RescaleIntercept
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = samples.astype(np.uint8).tobytes()
    return ds


def _rgb_to_ybr_full(rgb: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    """PS3.3 C.7.6.3.1.2 YBR_FULL equations (ITU-R BT.601 full range), written here."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    y = 0.2990 * r + 0.5870 * g + 0.1140 * b
    cb = -0.1687 * r - 0.3313 * g + 0.5000 * b + 128
    cr = 0.5000 * r - 0.4187 * g - 0.0813 * b + 128
    return np.clip(np.rint(np.stack([y, cb, cr], axis=-1)), 0, 255).astype(np.uint8)


def _pydicom_example(name: str) -> Path:
    found = get_testdata_file(name)
    if found is None:
        pytest.skip(f"pydicom example {name} not installed (pydicom-data is a dev dependency)")
    return Path(str(found))


def test_rgb_native_frames_are_stored_values(tmp_path: Path) -> None:
    # Prepare: two RGB frames, pixel-interleaved
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(2, 4, 6, 3), dtype=np.uint8)
    write_dataset(_color_dataset(rgb, "RGB", frames=2), tmp_path / "rgb.dcm")
    # Execute
    values = read_frames(tmp_path / "rgb.dcm")
    # Assert
    assert values.dtype == np.float32
    assert values.shape == (2, 4, 6, 3)
    np.testing.assert_array_equal(values, rgb.astype(np.float32))


def test_ybr_full_is_converted_to_rgb(tmp_path: Path) -> None:
    # Prepare: RGB encoded as YBR_FULL with the standard's equations
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(8, 8, 3)).astype(np.float64)
    write_dataset(_color_dataset(_rgb_to_ybr_full(rgb), "YBR_FULL"), tmp_path / "ybr.dcm")
    # Execute
    values = read_frames(tmp_path / "ybr.dcm")
    # Assert: back to RGB within rounding of the 8-bit YCbCr values
    assert values.shape == (1, 8, 8, 3)
    assert np.abs(values[0] - rgb).max() <= 3.0


def test_native_ybr_full_422_is_upsampled_and_converted(tmp_path: Path) -> None:
    # Prepare: pairs of horizontally adjacent pixels share one colour, so 4:2:2 loses nothing;
    # native 4:2:2 stores Y1 Y2 Cb Cr per pair (PS3.3 C.7.6.3.1.2)
    rng = np.random.default_rng(2)
    pairs = rng.integers(0, 256, size=(4, 3, 3)).astype(np.float64)
    rgb = np.repeat(pairs, 2, axis=1)  # 4 x 6
    ybr = _rgb_to_ybr_full(rgb).astype(np.uint8)
    packed = np.stack(
        [ybr[:, 0::2, 0], ybr[:, 1::2, 0], ybr[:, 0::2, 1], ybr[:, 0::2, 2]], axis=-1
    )
    ds = _color_dataset(ybr, "YBR_FULL_422")
    ds.PixelData = packed.astype(np.uint8).tobytes()
    write_dataset(ds, tmp_path / "422.dcm")
    # Execute
    values = read_frames(tmp_path / "422.dcm")
    record = classify_file(tmp_path / "422.dcm", "422.dcm", require_deidentified=True,
                           accept_color=True, decode_pixels=True)
    # Assert: the scanner's length check knows 4:2:2 is two thirds of three samples
    assert values.shape == (1, 4, 6, 3)
    assert np.abs(values[0] - rgb).max() <= 3.0
    assert isinstance(record, InstanceRecord)


def test_palette_color_maps_indices_through_the_lookup_tables(tmp_path: Path) -> None:
    # Prepare: 8-bit indices, 256-entry 16-bit LUTs (0028,1101)-(0028,1103), (0028,1201)-(0028,1203)
    indices = np.arange(16, dtype=np.uint8).reshape(4, 4)
    red = np.arange(256, dtype=np.uint16) * 256
    green = (255 - np.arange(256, dtype=np.uint16)) * 256
    blue = np.full(256, 1000, dtype=np.uint16)
    ds = make_dataset(pixels=np.zeros((4, 4), dtype=np.uint16))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.RescaleSlope, ds.RescaleIntercept
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    ds.PixelData = indices.tobytes()
    write_dataset(ds, tmp_path / "pal.dcm")
    # Execute
    values = read_frames(tmp_path / "pal.dcm")
    # Assert
    assert values.shape == (1, 4, 4, 3)
    np.testing.assert_array_equal(values[0, ..., 0], red[indices])
    np.testing.assert_array_equal(values[0, ..., 1], green[indices])
    np.testing.assert_array_equal(values[0, ..., 2], blue[indices])


def test_greyscale_multiframe_keeps_every_frame_with_the_modality_lut(tmp_path: Path) -> None:
    # Prepare: 3 frames 10, 20, 30; slope 2, intercept -5 (top-level Modality LUT)
    frames = np.stack([np.full((4, 5), v, dtype=np.uint16) for v in (10, 20, 30)])
    ds = make_dataset(pixels=frames[0], slope=2.0, intercept=-5.0)
    ds.NumberOfFrames = 3
    ds.PixelData = frames.astype("<u2").tobytes()
    write_dataset(ds, tmp_path / "mf.dcm")
    # Execute
    values = read_frames(tmp_path / "mf.dcm")
    # Assert
    assert values.shape == (3, 4, 5, 1)
    np.testing.assert_array_equal(values[:, 0, 0, 0], [15.0, 35.0, 55.0])


def test_enhanced_functional_group_rescale_applies_per_frame(tmp_path: Path) -> None:
    # Prepare: shared slope 1 / intercept -1024, frame 2 overrides with slope 2 / intercept 0
    frames = np.stack([np.full((2, 2), 100, dtype=np.uint16)] * 2)
    ds = make_dataset(pixels=frames[0])
    del ds.RescaleSlope, ds.RescaleIntercept
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<u2").tobytes()

    def group(slope: float, intercept: float) -> Dataset:
        transform = Dataset()
        transform.RescaleSlope, transform.RescaleIntercept = slope, intercept
        item = Dataset()
        item.PixelValueTransformationSequence = Sequence([transform])
        return item

    ds.SharedFunctionalGroupsSequence = Sequence([group(1.0, -1024.0)])
    ds.PerFrameFunctionalGroupsSequence = Sequence([Dataset(), group(2.0, 0.0)])
    write_dataset(ds, tmp_path / "enh.dcm")
    # Execute
    values = read_frames(tmp_path / "enh.dcm")
    # Assert
    assert frame_rescale(ds, 2) == [(1.0, -1024.0), (2.0, 0.0)]
    np.testing.assert_array_equal(values[:, 0, 0, 0], [-924.0, 200.0])


def test_monochrome1_stack_is_inverted_over_the_whole_stack(tmp_path: Path) -> None:
    # Prepare
    frames = np.stack([np.full((2, 2), 0, np.uint16), np.full((2, 2), 10, np.uint16)])
    ds = make_dataset(pixels=frames[0])
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.NumberOfFrames = 2
    ds.PixelData = frames.astype("<u2").tobytes()
    write_dataset(ds, tmp_path / "m1.dcm")
    # Execute
    values = read_frames(tmp_path / "m1.dcm")
    # Assert: the darkest frame (0, white in MONOCHROME1) becomes the brightest
    np.testing.assert_array_equal(values[:, 0, 0, 0], [10.0, 0.0])


def test_real_jpeg2000_ybr_rct_matches_its_uncompressed_rgb() -> None:
    # Prepare: pydicom-data holds the same ultrasound image uncompressed (RGB) and JPEG 2000
    # lossless (YBR_RCT, reversible colour transform) and lossy (YBR_ICT)
    rgb_path = _pydicom_example("US1_UNCR.dcm")
    rct_path = _pydicom_example("US1_J2KR.dcm")
    ict_path = _pydicom_example("US1_J2KI.dcm")
    # Execute
    rgb, rct, ict = read_frames(rgb_path), read_frames(rct_path), read_frames(ict_path)
    # Assert
    assert rgb.shape == rct.shape == ict.shape == (1, 480, 640, 3)
    np.testing.assert_array_equal(rct, rgb)
    assert float(np.abs(ict - rgb).mean()) < 2.0


def test_real_ybr_full_422_jpeg_multiframe_reads_every_frame() -> None:
    # Prepare: 30-frame JPEG baseline YBR_FULL_422 ultrasound clip
    path = _pydicom_example("examples_ybr_color.dcm")
    # Execute
    values = read_frames(path)
    # Assert: RGB stack; frames differ (a clip, not one frame repeated)
    assert values.shape == (30, 240, 320, 3)
    assert float(np.abs(values[0] - values[-1]).mean()) > 0.0


def test_missing_decoder_is_reported_as_such() -> None:
    # Prepare: JPEG Lossless (process 14) has no installed decoder here
    path = _pydicom_example("SC_rgb_jpeg_gdcm.dcm")
    # Execute
    with pytest.raises(PixelDecodeError) as info:
        read_frames(path)
    # Assert
    assert info.value.cause is DecodeCause.DECODER_MISSING
    assert str(path.parent) not in str(info.value)


def test_scanner_refuses_colour_by_default_and_accepts_it_on_request(tmp_path: Path) -> None:
    # Prepare
    rgb = np.random.default_rng(3).integers(0, 256, size=(4, 4, 3), dtype=np.uint8)
    write_dataset(_color_dataset(rgb, "RGB"), tmp_path / "rgb.dcm")
    write_dataset(make_dataset(), tmp_path / "grey.dcm")
    # Execute
    default = scan_directory(tmp_path, decode_pixels=True)
    opted = scan_directory(tmp_path, decode_pixels=True, accept_color=True)
    # Assert
    assert [r.relpath for r in default.records] == ["grey.dcm"]
    assert [(s.relpath, s.code) for s in default.skipped] == [
        ("rgb.dcm", SkipCode.UNSUPPORTED_IMAGE)
    ]
    assert sorted(r.relpath for r in opted.records) == ["grey.dcm", "rgb.dcm"]
    assert opted.skipped == ()


@pytest.mark.parametrize(
    ("photometric", "samples", "syntax", "named"),
    [
        ("YBR_RCT", 3, ExplicitVRLittleEndian, "(0028,0004)"),
        ("YBR_PARTIAL_420", 3, ExplicitVRLittleEndian, "(0028,0004)"),
        ("RGB", 4, ExplicitVRLittleEndian, "(0028,0002)"),
        ("PALETTE COLOR", 1, ExplicitVRLittleEndian, "(0028,1101)"),
    ],
)
def test_unreadable_colour_models_are_skipped_naming_tags(
    tmp_path: Path, photometric: str, samples: int, syntax: str, named: str
) -> None:
    # Prepare
    ds = _color_dataset(np.zeros((4, 4, 3), dtype=np.uint8), photometric)
    ds.SamplesPerPixel = samples
    ds.file_meta.TransferSyntaxUID = syntax
    if samples == 1:
        ds.PixelData = bytes(16)
    write_dataset(ds, tmp_path / "c.dcm")
    # Execute
    result = classify_file(tmp_path / "c.dcm", "c.dcm", require_deidentified=True,
                           accept_color=True)
    # Assert
    assert isinstance(result, SkippedFile)
    assert result.code is SkipCode.UNSUPPORTED_IMAGE
    assert named in result.text


def test_ybr_rct_is_accepted_under_jpeg_2000() -> None:
    # Prepare: a real JPEG 2000 lossless file with (0028,0004) YBR_RCT
    path = _pydicom_example("US1_J2KR.dcm")
    # Execute
    result = classify_file(path, "us.dcm", require_deidentified=False, accept_color=True,
                           decode_pixels=True)
    # Assert
    assert isinstance(result, InstanceRecord)
    assert (result.rows, result.columns) == (480, 640)
