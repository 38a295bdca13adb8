"""The segmentation loader reads DICOM SEG objects (highdicom) beside derived mask instances."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from client.data import PatientRecordDataset
from client.data.node_data import clear_cache
from client.data.segmentation import load_segmentation_data
from client.data.task_data import load_task_data
from client.data.transforms import image_transform
from client.dicom.pixels import read_pixels
from client.dicom.synth_seg import synthesize_segmentation_federation
from client.training import train_dp
from common.errors import DataError, safe_reason
from common.models import build_model
from tests.client.dicom._factory import make_dataset, write_dataset
from tests.client.dicom.test_seg import REAL_SEG_DIR, _write_seg

# highdicom warns that the factory's one-component Patient's Name may not be a person name
pytestmark = pytest.mark.filterwarnings("ignore:The string .* is unlikely:UserWarning")
SIDE = 16
torch.set_num_threads(1)


def _write_patient(folder: Path, patient_id: str, count: int = 2) -> list[Dataset]:
    """``count`` CT slices of one patient (one series, full plane geometry), each with a
    bright 4 x 5 block at a slice-dependent place."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    slices = []
    for k in range(count):
        pixels = np.full((SIDE, SIDE), 100, dtype=np.uint16)
        pixels[2 + 3 * k : 6 + 3 * k, 4:9] = 900
        ds = make_dataset(patient_id=patient_id, study_uid=study, series_uid=series,
                          instance_number=k + 1, pixels=pixels)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.ImagePositionPatient = [0.0, 0.0, float(k)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 1.0
        # type 2 (empty allowed) elements highdicom copies into the SEG
        for keyword in ("PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                        "ReferringPhysicianName", "AccessionNumber", "StudyID"):
            setattr(ds, keyword, "")
        ds.SeriesNumber = 1
        write_dataset(ds, folder / patient_id / f"ct{k}.dcm")
        slices.append(ds)
    return slices


def _block_masks(slices: list[Dataset]) -> npt.NDArray[np.uint8]:
    """One segment over the bright blocks: ``[slices, rows, cols, 1]``."""
    masks = np.zeros((len(slices), SIDE, SIDE, 1), dtype=np.uint8)
    for k in range(len(slices)):
        masks[k, 2 + 3 * k : 6 + 3 * k, 4:9, 0] = 1
    return masks


def _seg_site(folder: Path, patients: int = 6) -> list[list[Dataset]]:
    """``patients`` patients, each with its slices and one SEG file over them."""
    out = []
    for p in range(patients):
        slices = _write_patient(folder, f"PSEUDO-{p:03d}")
        _write_seg(folder / f"PSEUDO-{p:03d}", slices, _block_masks(slices))
        out.append(slices)
    return out


def _assert_safe(exc: DataError, *values: str) -> None:
    text = safe_reason(exc)
    assert all(value not in text for value in values), text


# ---------------------------------------------------------------- (a) real CT + liver SEG


def test_real_liver_seg_pairs_match_highdicom_at_native_size(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare: highdicom's own per-source masks of the SEG
    seg_path = shared_file(f"{REAL_SEG_DIR}/liver_seg.dcm")
    folder = seg_path.parent
    seg = hd.seg.segread(seg_path)
    slices = sorted(folder.glob("0?.dcm"))
    uids = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in slices]
    expected = np.asarray(
        seg.get_pixels_by_source_instance(  # dcmqi writes no (0028,135A): taken as YES
            source_sop_instance_uids=uids, combine_segments=True, ignore_spatial_locations=True)
    )
    transform = image_transform(512)
    images = [torch.as_tensor(transform(read_pixels(p)), dtype=torch.float32) for p in slices]
    # Execute: native size, every patient in training
    data = load_segmentation_data(folder, image_size=512, require_deidentified=False,
                                  val_fraction=0.0, test_fraction=0.0)
    # Assert: each loaded image is one slice, and its mask is highdicom's for that slice
    assert len(data.train) == 3 and data.train.num_patients == 1
    assert len(data.val) == len(data.test) == 0
    found = []
    for image, mask in zip(data.train.images, data.train.masks):
        (k,) = [k for k, ref in enumerate(images) if torch.equal(ref, image)]
        np.testing.assert_array_equal(mask.numpy(), (expected[k] > 0).astype(np.uint8))
        found.append(k)
    assert sorted(found) == [0, 1, 2]
    assert int(data.train.masks.sum()) == int((expected > 0).sum()) > 0


def test_real_liver_seg_foreground_fraction_survives_resizing(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare
    folder = shared_file(f"{REAL_SEG_DIR}/liver_seg.dcm").parent
    native = load_segmentation_data(folder, image_size=512, require_deidentified=False,
                                    val_fraction=0.0, test_fraction=0.0)
    # Execute
    small = load_segmentation_data(folder, image_size=64, require_deidentified=False,
                                   val_fraction=0.0, test_fraction=0.0)
    # Assert
    big = float(native.train.masks.float().mean())
    assert small.train.masks.shape == (3, 64, 64)
    assert abs(float(small.train.masks.float().mean()) - big) < 0.01 and big > 0.05


def test_real_slices_with_a_patient_name_are_refused_naming_the_tag(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare
    folder = shared_file(f"{REAL_SEG_DIR}/liver_seg.dcm").parent
    # Execute
    with pytest.raises(DataError, match="no usable image/mask pair") as info:
        load_segmentation_data(folder, image_size=32, require_deidentified=True)
    # Assert: the local message names the tag; the safe reason counts the phi skips
    assert "(0010,0010)" in str(info.value)
    assert "phi: 4" in info.value.safe_reason
    for text in (str(info.value), info.value.safe_reason):
        assert "JANCT000" not in text and "99000" not in text and str(folder) not in text


# ---------------------------------------------------------------- (b) synthetic SEG trains


def test_synthetic_seg_site_trains_one_private_unet_step(tmp_path: Path) -> None:
    # Prepare
    sites = _seg_site(tmp_path)
    clear_cache()
    # Execute
    data = load_task_data(tmp_path, task="segmentation", image_size=SIDE,
                          require_deidentified=True)
    model = build_model("unet", in_channels=1, num_classes=2, image_size=SIDE)
    result = train_dp(model, PatientRecordDataset(data.train), epochs=1, batch_size=64,
                      learning_rate=0.1, noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5,
                      private=True, seed=0)
    # Assert: every slice is a pair; masks are the SEG's blocks (native size 16)
    splits = (data.train, data.val, data.test)
    assert sum(len(s) for s in splits) == 2 * len(sites)
    assert sum(int(s.labels.sum()) for s in splits) == 20 * 2 * len(sites)
    assert data.train.labels.dtype == torch.int64 and data.train.labels.shape[1:] == (SIDE, SIDE)
    for image, mask in zip(data.train.images, data.train.labels):
        assert float(image[0][mask.bool()].mean()) > float(image[0][~mask.bool()].mean())
    assert result.steps == 1
    assert 0.0 < result.epsilon < float("inf")
    before = model.state_dict()
    assert any(not torch.equal(before[k], v) for k, v in result.state_dict.items())


def test_seg_and_derived_masks_mix_in_one_folder(tmp_path: Path) -> None:
    # Prepare: the synthetic demo's derived masks plus one patient labelled by a DICOM SEG
    [site] = synthesize_segmentation_federation(tmp_path / "demo", n_sites=1,
                                                patients_per_site=3, image_size=SIDE, seed=1)
    derived_only = load_segmentation_data(site.path, image_size=SIDE, val_fraction=0.0,
                                          test_fraction=0.0)
    slices = _write_patient(site.path, "PSEUDO-SEG")
    _write_seg(site.path / "PSEUDO-SEG", slices, _block_masks(slices))
    # Execute
    mixed = load_segmentation_data(site.path, image_size=SIDE, val_fraction=0.0,
                                   test_fraction=0.0)
    # Assert
    assert len(mixed.train) == len(derived_only.train) + 2
    assert mixed.train.num_patients == derived_only.train.num_patients + 1
    assert int(mixed.train.masks.sum()) == int(derived_only.train.masks.sum()) + 40


def test_segment_numbers_are_classes_when_more_than_two_are_asked(tmp_path: Path) -> None:
    # Prepare: two segments, the second (number 2) overlapping the first
    slices = _write_patient(tmp_path, "PSEUDO-000", count=1)
    masks = np.zeros((1, SIDE, SIDE, 2), dtype=np.uint8)
    masks[0, 0:8, :, 0] = 1
    masks[0, 6:10, :, 1] = 1
    _write_seg(tmp_path, slices, masks)
    # Execute
    binary = load_segmentation_data(tmp_path, image_size=SIDE, val_fraction=0.0,
                                    test_fraction=0.0)
    classes = load_segmentation_data(tmp_path, image_size=SIDE, val_fraction=0.0,
                                     test_fraction=0.0, num_classes=3)
    # Assert
    assert binary.train.masks[0, :10].eq(1).all() and binary.train.masks[0, 10:].eq(0).all()
    rows = classes.train.masks[0, :, 0].tolist()
    assert rows == [1] * 6 + [2] * 4 + [0] * 6


def test_a_segment_number_beyond_the_classes_is_refused(tmp_path: Path) -> None:
    # Prepare: three segments, but only classes 0..2 asked
    slices = _write_patient(tmp_path, "PSEUDO-000", count=1)
    masks = np.zeros((1, SIDE, SIDE, 3), dtype=np.uint8)
    for n in range(3):
        masks[0, 4 * n : 4 * n + 3, :, n] = 1
    _write_seg(tmp_path, slices, masks)
    # Execute
    with pytest.raises(DataError, match=r"Segment Number 3") as info:
        load_segmentation_data(tmp_path, image_size=SIDE, val_fraction=0.0, test_fraction=0.0,
                               num_classes=3)
    # Assert
    assert "more segments than the task has classes" in info.value.safe_reason


# ---------------------------------------------------------------- (c) malformed SEG files


def _damage(path: Path, damage: str) -> None:
    ds = pydicom.dcmread(path)
    if damage == "no-source-reference":
        del ds.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence
    elif damage == "spatial-not-preserved":
        source = ds.PerFrameFunctionalGroupsSequence[1].DerivationImageSequence[0]
        source.SourceImageSequence[0].SpatialLocationsPreserved = "NO"
    else:
        del ds.SegmentSequence
    ds.save_as(path)


@pytest.mark.parametrize("damage", ["no-source-reference", "spatial-not-preserved", "unreadable"])
def test_malformed_seg_leaves_its_images_unmasked_with_its_code(
    tmp_path: Path, damage: str
) -> None:
    # Prepare: one good patient, one whose SEG is damaged
    sites = _seg_site(tmp_path, patients=2)
    _damage(tmp_path / "PSEUDO-001" / "seg.dcm", damage)
    clear_cache()
    # Execute
    with pytest.raises(DataError, match="has no lesion mask") as info:
        load_task_data(tmp_path, task="segmentation", image_size=SIDE)
    # Assert: a DataError (what the ClientApp sends as its safe reason), naming the code
    assert f"{damage}: 1" in str(info.value) and f"{damage}: 1" in info.value.safe_reason
    _assert_safe(info.value, str(tmp_path), "PSEUDO-", *(s.SOPInstanceUID for s in sites[1]))


def test_seg_missing_one_image_keeps_the_rest_and_logs_its_code(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Prepare: one slice the SEG references is gone
    _seg_site(tmp_path, patients=2)
    (tmp_path / "PSEUDO-001" / "ct1.dcm").unlink()
    # Execute
    with caplog.at_level(logging.WARNING, logger="client.data.segmentation_masks"):
        data = load_segmentation_data(tmp_path, image_size=SIDE, val_fraction=0.0,
                                      test_fraction=0.0)
    # Assert
    assert len(data.train) == 3
    (record,) = [r for r in caplog.records if "[missing-image]" in r.getMessage()]
    assert "1 of 2 referenced images" in record.getMessage()
    assert str(tmp_path) not in record.getMessage() and "seg.dcm" not in record.getMessage()


def test_seg_whose_images_are_all_missing_is_a_clear_error(tmp_path: Path) -> None:
    # Prepare: only the SEG is left
    sites = _seg_site(tmp_path, patients=1)
    for path in (tmp_path / "PSEUDO-000").glob("ct*.dcm"):
        path.unlink()
    # Execute
    with pytest.raises(DataError, match="no usable image/mask pair") as info:
        load_segmentation_data(tmp_path, image_size=SIDE)
    # Assert
    assert "segmentation files not used: missing-image: 1" in info.value.safe_reason
    _assert_safe(info.value, str(tmp_path), "PSEUDO-", *(s.SOPInstanceUID for s in sites[0]))


def test_image_labelled_by_two_segs_is_refused(tmp_path: Path) -> None:
    # Prepare
    [slices] = _seg_site(tmp_path, patients=1)
    shutil.copy(tmp_path / "PSEUDO-000" / "seg.dcm", tmp_path / "copy.dcm")
    ds = pydicom.dcmread(tmp_path / "copy.dcm")
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(tmp_path / "copy.dcm")
    # Execute
    with pytest.raises(DataError, match="two DICOM SEG files") as info:
        load_segmentation_data(tmp_path, image_size=SIDE)
    # Assert
    _assert_safe(info.value, str(tmp_path), *(s.SOPInstanceUID for s in slices))
