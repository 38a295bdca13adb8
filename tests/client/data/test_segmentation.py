"""Segmentation variant of the synthetic DICOM data and its loader."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_modality_lut

from client.data.segmentation import SegmentationPatientDataset, load_segmentation_data
from client.data.splits import split_patients
from client.dicom.phi import check_deidentified
from client.dicom.synth_phantom import draw_anatomy, draw_lesion, render_slice
from client.dicom.synth_seg import (
    MASK_MODALITY,
    MASK_SERIES_DESCRIPTION,
    SegSiteSummary,
    lesion_mask,
    synthesize_segmentation_federation,
)
from common.errors import ConfigError, DataError

SIZE = 32


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, SegSiteSummary]:
    out = tmp_path_factory.mktemp("segfed")
    [summary] = synthesize_segmentation_federation(
        out, n_sites=1, patients_per_site=12, image_size=SIZE, seed=5
    )
    return summary.path, summary


def _copy(site: tuple[Path, SegSiteSummary], tmp_path: Path) -> Path:
    dst = tmp_path / "site"
    shutil.copytree(site[0], dst)
    return dst


def test_lesion_mask_matches_rendered_lesion_region() -> None:
    # The mask must be where render_slice adds the lesion contrast (thresholded at half).
    dices = []
    for patient in range(12):
        rng = np.random.default_rng([11, patient])
        anatomy = draw_anatomy(rng)
        lesion = draw_lesion(rng, anatomy, mean_contrast_hu=700.0, n_slices=3)
        for k, z in enumerate((-6.0, 0.0, 6.0)):
            kwargs = {"z_mm": z, "slice_index": k, "size": 64, "spacing_mm": 6.0}
            diff = render_slice(anatomy, lesion, **kwargs) - render_slice(anatomy, None, **kwargs)
            region = diff > 0.5 * lesion.contrast_hu
            mask = lesion_mask(anatomy, lesion, z_mm=z, size=64, spacing_mm=6.0)
            if region.sum() + mask.sum() >= 10:
                dices.append(_dice(mask, region))
    assert len(dices) >= 10
    assert np.mean(dices) >= 0.9 and min(dices) >= 0.75


def test_written_masks_align_with_bright_lesions_and_reference_images(
    site: tuple[Path, SegSiteSummary],
) -> None:
    root, summary = site
    mask_files = sorted(root.glob("dicom/*/ST1/SE2/MASK*.dcm"))
    image_files = sorted(root.glob("dicom/*/ST1/SE1/IM*.dcm"))
    assert len(mask_files) == len(image_files) == summary.images
    assert summary.lesion_images >= 3
    images = {}
    for path in image_files:
        ds = pydicom.dcmread(path)
        images[ds.SOPInstanceUID] = ds
    contrasts = []
    for path in mask_files:
        mask_ds = pydicom.dcmread(path)
        # Header: its own series in the image's study, PHI-free, references its image
        image = images[mask_ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID]
        assert mask_ds.Modality == MASK_MODALITY
        assert mask_ds.SeriesDescription == MASK_SERIES_DESCRIPTION
        assert mask_ds.StudyInstanceUID == image.StudyInstanceUID
        assert mask_ds.SeriesInstanceUID != image.SeriesInstanceUID
        assert mask_ds.BitsAllocated == 8 and "DERIVED" in mask_ds.ImageType
        assert check_deidentified(mask_ds).deidentified
        assert "StudyDate" not in mask_ds and "InstitutionName" not in mask_ds
        mask = mask_ds.pixel_array
        assert set(np.unique(mask)) <= {0, 1}
        if mask.sum() >= 4:
            hu = apply_modality_lut(image.pixel_array, image).astype(float)
            inside = hu[mask > 0].mean()
            grown = np.zeros_like(mask, dtype=bool)
            ys, xs = np.nonzero(mask)
            grown[max(ys.min() - 3, 0) : ys.max() + 4, max(xs.min() - 3, 0) : xs.max() + 4] = True
            ring = grown & (mask == 0)
            contrasts.append(inside - hu[ring].mean())
    assert len(contrasts) >= 3
    assert min(contrasts) > 100.0  # lesions are several hundred HU brighter than around


def test_round_trip_pairs_every_image_with_its_mask(site: tuple[Path, SegSiteSummary]) -> None:
    root, summary = site
    data = load_segmentation_data(root, image_size=SIZE, seed=0)
    splits = [data.train, data.val, data.test]
    assert sum(len(s) for s in splits) == summary.images
    assert sum(s.num_patients for s in splits) == summary.patients
    # Same size as written: no resampling, so lesion pixels are preserved exactly.
    assert sum(int(s.masks.sum()) for s in splits) == summary.lesion_pixels
    for split in splits:
        assert split.images.dtype.is_floating_point and split.images.shape[1:] == (1, SIZE, SIZE)
        assert split.masks.shape == (len(split), SIZE, SIZE)
        assert str(split.masks.dtype) == "torch.uint8"
    expected = split_patients([f"S1-P{i + 1:04d}" for i in range(12)], seed=0)
    assert data.train.num_patients == len(expected.train)
    dataset = SegmentationPatientDataset(data.train)
    image, mask = dataset[0]
    assert len(dataset) == data.train.num_patients
    assert image.shape == (1, SIZE, SIZE) and mask.shape == (SIZE, SIZE)
    # Each mask's lesion is bright in its own image (pairing, not just counts).
    for split in splits:
        for img, msk in zip(split.images, split.masks):
            if int(msk.sum()) >= 4:
                assert float(img[0][msk.bool()].mean()) > float(img[0][~msk.bool()].mean())


def test_pairing_uses_references_not_paths(
    site: tuple[Path, SegSiteSummary], tmp_path: Path
) -> None:
    # Move every mask into one flat folder under shuffled names: pairing must not change.
    root = _copy(site, tmp_path)
    reference = load_segmentation_data(site[0], image_size=16, seed=0)
    flat = root / "masks"
    flat.mkdir()
    for n, path in enumerate(sorted(root.glob("dicom/*/ST1/SE2/MASK*.dcm"), reverse=True)):
        path.rename(flat / f"m{n:03d}.dcm")
    moved = load_segmentation_data(root, image_size=16, seed=0)
    for a, b in ((reference.train, moved.train), (reference.test, moved.test)):
        assert np.array_equal(a.masks.numpy(), b.masks.numpy())
        assert np.array_equal(a.images.numpy(), b.images.numpy())


def test_missing_mask_is_a_clear_error(site: tuple[Path, SegSiteSummary], tmp_path: Path) -> None:
    root = _copy(site, tmp_path)
    next(iter(sorted(root.glob("dicom/*/ST1/SE2/MASK1.dcm")))).unlink()
    with pytest.raises(DataError, match="has no lesion mask") as info:
        load_segmentation_data(root, image_size=SIZE)
    assert "path" not in info.value.safe_reason and "mask" in info.value.safe_reason


def test_truncated_mask_is_reported(site: tuple[Path, SegSiteSummary], tmp_path: Path) -> None:
    root = _copy(site, tmp_path)
    path = sorted(root.glob("dicom/*/ST1/SE2/MASK*.dcm"))[0]
    path.write_bytes(path.read_bytes()[:-200])
    with pytest.raises(DataError, match=r"1 file\(s\) .* skipped"):
        load_segmentation_data(root, image_size=SIZE)


def test_mask_without_reference_or_wrong_size(
    site: tuple[Path, SegSiteSummary], tmp_path: Path
) -> None:
    root = _copy(site, tmp_path)
    path = sorted(root.glob("dicom/*/ST1/SE2/MASK*.dcm"))[0]
    ds = pydicom.dcmread(path)
    del ds.ReferencedImageSequence
    ds.save_as(path)
    with pytest.raises(DataError, match="Referenced Image Sequence"):
        load_segmentation_data(root, image_size=SIZE)
    ds = pydicom.dcmread(sorted(root.glob("dicom/*/ST1/SE1/IM*.dcm"))[0])
    fixed = pydicom.dcmread(path)
    ref = pydicom.Dataset()
    ref.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    fixed.ReferencedImageSequence = pydicom.Sequence([ref])
    fixed.Rows = fixed.Columns = SIZE // 2
    fixed.PixelData = np.zeros((SIZE // 2, SIZE // 2), dtype=np.uint8).tobytes()
    fixed.save_as(path)
    with pytest.raises(DataError, match="has shape"):
        load_segmentation_data(root, image_size=SIZE)


def test_deterministic_and_refuses_non_empty_folder(tmp_path: Path) -> None:
    a, b = (
        synthesize_segmentation_federation(
            tmp_path / name, n_sites=1, patients_per_site=1, image_size=16
        )
        for name in ("a", "b")
    )
    files_a = sorted(p.relative_to(a[0].path) for p in a[0].path.rglob("*.dcm"))
    assert files_a == sorted(p.relative_to(b[0].path) for p in b[0].path.rglob("*.dcm"))
    for rel in files_a:
        assert (a[0].path / rel).read_bytes() == (b[0].path / rel).read_bytes()
    with pytest.raises(ConfigError):
        synthesize_segmentation_federation(tmp_path / "a", n_sites=1, patients_per_site=1)
    with pytest.raises(ConfigError):
        synthesize_segmentation_federation(tmp_path / "c", prevalence=1.5)
