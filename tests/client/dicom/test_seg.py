"""DICOM SEG masks matched to their images (highdicom), with per-file reasons."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from client.dicom.pixels import read_pixels
from client.dicom.reasons import SkipCode
from client.dicom.seg import MaskCode, match_segmentations, scan_segmentations
from client.dicom.scan import scan_directory
from tests.client.dicom._factory import make_dataset, write_dataset

REAL_SEG_DIR = "dicom/dcmqi_ct_3slice_liverseg"
# highdicom warns that the factory's one-component Patient's Name may not be a person name
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")
SHAPE = (8, 10)


def _write_ct_slices(folder: Path, count: int = 3) -> list[Dataset]:
    """Single-frame CT slices of one series, 1 mm apart, with full plane geometry."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(count):
        ds = make_dataset(study_uid=study, series_uid=series, instance_number=k + 1,
                          pixels=np.full(SHAPE, 100 + k, dtype=np.uint16))
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1.0
        # type 2 (empty allowed) elements highdicom copies into the SEG
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID"):
            setattr(ds, keyword, "")
        ds.SeriesNumber = 1
        write_dataset(ds, folder / f"ct{k}.dcm")
        slices.append(ds)
    return slices


def _segment(number: int, label: str) -> hd.seg.SegmentDescription:
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label,
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def _write_seg(
    folder: Path, sources: list[Dataset], masks: npt.NDArray[np.uint8], name: str = "seg.dcm"
) -> Path:
    """A BINARY SEG over ``sources``; ``masks`` is [slices, rows, cols, segments]."""
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=masks,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[_segment(n + 1, f"part {n + 1}") for n in range(masks.shape[-1])],
        series_instance_uid=generate_uid(),
        series_number=10,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="test",
        software_versions="0",
        device_serial_number="0",
        omit_empty_frames=False,
    )
    seg.PatientIdentityRemoved = "YES"
    seg.DeidentificationMethod = "test"
    seg.DeviceSerialNumber = ""  # the de-identification gate refuses device identity
    path = folder / name
    seg.save_as(path)
    return path


def _two_segment_masks(count: int = 3) -> npt.NDArray[np.uint8]:
    masks = np.zeros((count, *SHAPE, 2), dtype=np.uint8)
    for k in range(count):
        masks[k, k : k + 3, 1:4, 0] = 1
        masks[k, 5:7, k + 2 : k + 6, 1] = 1
    return masks


def test_two_segment_seg_is_matched_to_each_source_slice(tmp_path: Path) -> None:
    # Prepare
    sources = _write_ct_slices(tmp_path)
    masks = _two_segment_masks()
    _write_seg(tmp_path, sources, masks)
    # Execute
    _, outcome = scan_segmentations(tmp_path)
    # Assert
    assert [(r.code, r.images_matched) for r in outcome.reports] == [(MaskCode.MATCHED, 3)]
    assert len(outcome.images) == 3
    by_sop = {m.image.sop_instance_uid: m for m in outcome.matched}
    for k, source in enumerate(sources):
        match = by_sop[source.SOPInstanceUID]
        assert match.segment_numbers == (1, 2)
        assert match.masks.dtype == np.uint8
        np.testing.assert_array_equal(match.masks, np.moveaxis(masks[k], -1, 0))


def test_mask_without_its_image_is_reported_and_the_rest_matched(tmp_path: Path) -> None:
    # Prepare: the SEG references three slices, one slice file is gone
    sources = _write_ct_slices(tmp_path)
    _write_seg(tmp_path, sources, _two_segment_masks())
    (tmp_path / "ct1.dcm").unlink()
    # Execute
    _, outcome = scan_segmentations(tmp_path)
    # Assert
    (report,) = outcome.reports
    assert report.code is MaskCode.MISSING_IMAGE
    assert "1 of 3 referenced images" in report.text
    assert report.images_matched == 2
    assert {m.image.relpath for m in outcome.matched} == {"ct0.dcm", "ct2.dcm"}


def test_image_of_another_shape_is_a_shape_mismatch(tmp_path: Path) -> None:
    # Prepare: slice 2 is rewritten with the same SOP Instance UID but 6 x 6 pixels
    sources = _write_ct_slices(tmp_path)
    _write_seg(tmp_path, sources, _two_segment_masks())
    smaller = sources[2].copy()
    smaller.Rows = smaller.Columns = 6
    smaller.PixelData = np.zeros((6, 6), dtype="<u2").tobytes()
    write_dataset(smaller, tmp_path / "ct2.dcm")
    # Execute
    _, outcome = scan_segmentations(tmp_path)
    # Assert
    (report,) = outcome.reports
    assert report.code is MaskCode.SHAPE_MISMATCH
    assert "(0028,0010)" in report.text and "1 of 3" in report.text
    assert report.images_matched == 2


@pytest.mark.parametrize(
    ("damage", "code"),
    [
        ("drop-source", MaskCode.NO_SOURCE_REFERENCE),
        ("not-preserved", MaskCode.SPATIAL_NOT_PRESERVED),
        ("no-segments", MaskCode.UNREADABLE),
    ],
)
def test_damaged_seg_is_reported_never_raised(tmp_path: Path, damage: str, code: MaskCode) -> None:
    # Prepare
    sources = _write_ct_slices(tmp_path)
    path = _write_seg(tmp_path, sources, _two_segment_masks())
    ds = pydicom.dcmread(path)
    frames = ds.PerFrameFunctionalGroupsSequence
    if damage == "drop-source":
        del frames[0].DerivationImageSequence
    elif damage == "not-preserved":
        frames[1].DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved = "NO"
    else:
        del ds.SegmentSequence
    ds.save_as(path)
    # Execute
    _, outcome = scan_segmentations(tmp_path)
    # Assert
    (report,) = outcome.reports
    assert report.code is code
    assert outcome.matched == ()
    text = repr(report.to_dict())
    assert all(s.SOPInstanceUID not in text for s in sources)
    assert str(tmp_path) not in text


def test_derived_image_mask_convention_is_left_to_the_data_layer(tmp_path: Path) -> None:
    # Prepare: the project's older convention: an OT mask with (0008,1140)
    (image,) = _write_ct_slices(tmp_path, count=1)
    mask = make_dataset(pixels=np.zeros(SHAPE, dtype=np.uint16))
    mask.Modality = "OT"
    reference = Dataset()
    reference.ReferencedSOPClassUID = image.SOPClassUID
    reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
    mask.ReferencedImageSequence = [reference]
    write_dataset(mask, tmp_path / "mask.dcm")
    # Execute
    _, outcome = scan_segmentations(tmp_path)
    # Assert: no SEG here: nothing read as one, both files stay candidate images
    assert outcome.reports == () and outcome.matched == ()
    assert len(outcome.images) == 2


def _nrrd_mask(path: Path) -> tuple[npt.NDArray[np.int16], float]:
    """Parse the gzip NRRD beside the SEG: ``[z, y, x]`` and the z of its first slice."""
    raw = path.read_bytes()
    head, _, body = raw.partition(b"\n\n")
    fields = dict(
        line.split(": ", 1) for line in head.decode().splitlines()[1:] if ": " in line
    )
    assert fields["encoding"] == "gzip" and fields["type"] == "short"
    sizes = [int(v) for v in fields["sizes"].split()]
    data = np.frombuffer(gzip.decompress(body), dtype="<i2").reshape(sizes[::-1])
    origin_z = float(fields["space origin"].strip("()").split(",")[2])
    return data, origin_z


def test_real_liver_seg_matches_its_three_ct_slices(shared_file: Callable[[str], Path]) -> None:
    # Prepare: the same mask is in liver_seg.nrrd (LPS, axes x, y, z; z step 1 mm)
    seg_path = shared_file(f"{REAL_SEG_DIR}/liver_seg.dcm")
    expected, origin_z = _nrrd_mask(shared_file(f"{REAL_SEG_DIR}/liver_seg.nrrd"))
    # Execute
    scan, outcome = scan_segmentations(seg_path.parent, require_deidentified=False)
    # Assert
    assert [(r.code, r.images_matched) for r in outcome.reports] == [(MaskCode.MATCHED, 3)]
    assert sorted(m.image.relpath for m in outcome.matched) == ["01.dcm", "02.dcm", "03.dcm"]
    for match in outcome.matched:
        header = pydicom.dcmread(match.image.path, stop_before_pixels=True)
        assert match.masks.shape == (1, *read_pixels(match.image.path).shape)
        assert match.masks.shape[1:] == (int(header.Rows), int(header.Columns))
        z_index = int(round(float(header.ImagePositionPatient[2]) - origin_z))
        np.testing.assert_array_equal(match.masks[0], (expected[z_index] > 0).astype(np.uint8))
        assert match.segment_numbers == (1,)
    assert len(scan.records) == 4


def test_real_slices_with_a_patient_name_are_refused_when_deidentification_is_required(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare
    seg_path = shared_file(f"{REAL_SEG_DIR}/liver_seg.dcm")
    # Execute
    scan, outcome = scan_segmentations(seg_path.parent, require_deidentified=True)
    # Assert
    refused = {s.relpath: s for s in scan.skipped if s.code is SkipCode.PHI}
    assert {"01.dcm", "02.dcm", "03.dcm"} <= set(refused)
    assert all("(0010,0010)" in s.text for s in refused.values())
    assert "JANCT000" not in repr([s.to_dict() for s in scan.skipped])
    assert outcome.matched == ()


def test_match_segmentations_accepts_scanner_records(tmp_path: Path) -> None:
    # Prepare: the de-identified synthetic SEG and slices pass the scanner's default check
    sources = _write_ct_slices(tmp_path, count=2)
    _write_seg(tmp_path, sources, _two_segment_masks(count=2))
    scan = scan_directory(tmp_path, require_deidentified=True)
    # Execute
    outcome = match_segmentations(scan.records)
    # Assert
    assert scan.skipped == ()
    assert outcome.code_counts["matched"] == 1
    assert len(outcome.matched) == 2
