"""Augmentation of training records at the node (client/data/augment.py)."""

from __future__ import annotations

import pytest
import torch

from client.data.augment import AugmentedDataset, augment_dataset, augment_transform, resolve_level
from client.data.node_data import PatientRecordDataset, SplitArrays
from common.errors import ConfigError


def _split(images: torch.Tensor, labels: torch.Tensor) -> SplitArrays:
    n = images.shape[0]
    return SplitArrays(images=images, labels=labels, patient_index=torch.arange(n),
                       num_patients=n)


def test_auto_is_chosen_per_task_and_sample_kind() -> None:
    assert resolve_level("auto", "binary", "image-2d") == "light"
    assert resolve_level("auto", "segmentation", "image-2d") == "light"
    assert resolve_level("auto", "multiclass", "volume-3d") == "light"
    assert resolve_level("auto", "binary", "series") == "none"
    assert resolve_level("auto", "reconstruction", "image-2d") == "none"
    assert resolve_level("strong", "binary", "series") == "strong"
    assert augment_transform("none", "binary", "image-2d") is None


def test_unknown_level_is_refused() -> None:
    with pytest.raises(ConfigError, match="augment must be one of"):
        resolve_level("heavy", "binary", "image-2d")


def test_none_leaves_the_dataset_alone() -> None:
    base = PatientRecordDataset(_split(torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 0])))
    assert augment_dataset(base, "none", "binary", "image-2d") is base


@pytest.mark.parametrize("level", ["light", "strong"])
def test_images_keep_shape_dtype_and_label(level: str) -> None:
    torch.manual_seed(0)
    images = torch.rand(4, 1, 16, 16)
    base = PatientRecordDataset(_split(images, torch.tensor([0, 1, 1, 0])))
    data = augment_dataset(base, level, "binary", "image-2d")
    assert isinstance(data, AugmentedDataset)
    changed = 0
    for i in range(4):
        for _ in range(5):
            image, label = data[i]
            assert type(image) is torch.Tensor and image.shape == (1, 16, 16)
            assert image.dtype == torch.float32 and int(label) == [0, 1, 1, 0][i]
            changed += int(not torch.allclose(image, images[i]))
    assert changed > 0


def test_volumes_keep_their_shape() -> None:
    torch.manual_seed(1)
    base = PatientRecordDataset(_split(torch.rand(2, 1, 8, 8, 8), torch.tensor([0, 1])))
    image, _ = augment_dataset(base, "strong", "multiclass", "volume-3d")[0]
    assert image.shape == (1, 8, 8, 8) and type(image) is torch.Tensor


def test_masks_are_transformed_with_their_images() -> None:
    torch.manual_seed(2)
    mask = torch.zeros(16, 16, dtype=torch.int64)
    mask[2:9, 3:7] = 1  # asymmetric: a flip or a rotation moves it
    mask[10:14, 9:15] = 2
    image = (mask.float() / 2).unsqueeze(0)  # the image shows the mask
    base = PatientRecordDataset(_split(image.unsqueeze(0), mask.unsqueeze(0)))
    data = augment_dataset(base, "light", "segmentation", "image-2d")
    moved = 0
    for _ in range(20):
        picture, target = data[0]
        assert target.dtype == torch.int64 and target.shape == (16, 16)
        assert set(target.unique().tolist()) <= {0, 1, 2}
        # the image's structure follows the mask: same class where the image says so
        seen = torch.bucketize(picture[0], torch.tensor([0.25, 0.75]))
        assert (seen == target).float().mean() > 0.9
        moved += int(not torch.equal(target, mask))
    assert moved > 0
