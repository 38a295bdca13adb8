"""Data augmentation of the training records at the node (``--augment``), with MONAI transforms.

The run setting ``augment`` (:attr:`common.config.TrainPlan.augment`) picks one of
:data:`common.config.AUGMENT_LEVELS`; :func:`resolve_level` turns ``auto`` into a level for the
task and the sample kind, and :func:`augment_transform` builds the transform:

==============  =====================================  ==================================
samples         light                                  strong (light plus)
==============  =====================================  ==================================
image-2d        left-right flip, rotation <= 15 deg,    affine (rotation <= 25 deg, scale
                intensity scale/shift +-10 % / 5 %      +-15 %, shift <= 10 %), contrast
                                                       (gamma 0.7..1.5), Gaussian noise
volume-3d       flips along each axis, small 3D        3D affine (rotation <= 15 deg,
                rotation (<= 10 deg), intensity        scale +-10 %), contrast, noise
series          none under ``auto`` (slice order and spacing carry meaning); light/strong as
                for volumes when asked for explicitly
==============  =====================================  ==================================

Segmentation applies every spatial transform to the image and its mask together (the mask
with nearest-neighbour interpolation, so it keeps its class values); intensity transforms
touch the image only. ``auto`` is ``light`` for every task except ``reconstruction`` (whose
target is the input itself: nothing to gain) and series, where it is ``none``.

Privacy: augmentation happens inside one record (:class:`AugmentedDataset` transforms the
item that the wrapped per-patient dataset returns), so one patient's gradient still depends
on that patient's record only, and DP-SGD's per-sample clipping and the accountant are
unchanged. Its randomness is the node's (never seeded from the plan in a private run).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset

from common.errors import ConfigError

__all__ = ["AugmentedDataset", "augment_dataset", "augment_transform", "augment_view",
           "resolve_level"]

IMAGE_KEY = "image"
MASK_KEY = "mask"
#: Levels that build a transform (``none`` builds none, ``auto`` is resolved first).
_LEVELS = ("light", "strong")

Transform = Callable[[Any], Any]


def resolve_level(level: str, task: str, samples: str) -> str:
    """The level ``augment=level`` means for ``task`` on ``samples`` (``auto`` resolved).

    Raises
    ------
    ConfigError
        ``level`` is not one of none, light, strong, auto.
    """
    if level not in ("none", "auto", *_LEVELS):
        raise ConfigError(f"augment must be one of none, light, strong, auto, got {level!r}",
                          safe_reason="refused: unknown augment level")
    if level != "auto":
        return level
    if task == "reconstruction" or samples == "series":
        return "none"
    return "light"


def _image_2d(level: str, keys: tuple[str, ...], modes: tuple[str, ...]) -> list[Any]:
    from monai.transforms import (
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    out: list[Any] = [
        RandFlipd(keys=keys, prob=0.5, spatial_axis=1),
        RandRotated(keys=keys, range_x=math.radians(15), prob=0.5, mode=modes,
                    padding_mode="border", keep_size=True),
        RandScaleIntensityd(keys=IMAGE_KEY, factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=IMAGE_KEY, offsets=0.05, prob=0.5),
    ]
    if level == "strong":
        out += [
            RandAffined(keys=keys, prob=0.5, rotate_range=math.radians(25),
                        scale_range=0.15, translate_range=0.1, mode=modes,
                        padding_mode="border"),
            RandAdjustContrastd(keys=IMAGE_KEY, prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianNoised(keys=IMAGE_KEY, prob=0.3, std=0.03),
        ]
    return out


def _volume(level: str, keys: tuple[str, ...], modes: tuple[str, ...]) -> list[Any]:
    from monai.transforms import (
        RandAdjustContrastd,
        RandAffined,
        RandFlipd,
        RandGaussianNoised,
        RandRotated,
        RandScaleIntensityd,
        RandShiftIntensityd,
    )

    small = math.radians(10)
    out: list[Any] = [RandFlipd(keys=keys, prob=0.5, spatial_axis=axis) for axis in range(3)]
    out += [
        RandRotated(keys=keys, range_x=small, range_y=small, range_z=small, prob=0.3,
                    mode=modes, padding_mode="border", keep_size=True),
        RandScaleIntensityd(keys=IMAGE_KEY, factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=IMAGE_KEY, offsets=0.05, prob=0.5),
    ]
    if level == "strong":
        out += [
            RandAffined(keys=keys, prob=0.5, rotate_range=(math.radians(15),) * 3,
                        scale_range=(0.1,) * 3, mode=modes, padding_mode="border"),
            RandAdjustContrastd(keys=IMAGE_KEY, prob=0.3, gamma=(0.7, 1.5)),
            RandGaussianNoised(keys=IMAGE_KEY, prob=0.3, std=0.03),
        ]
    return out


def augment_transform(level: str, task: str, samples: str) -> Transform | None:
    """The MONAI transform of ``level`` for ``task`` on ``samples`` (None: no augmentation).

    The transform takes a dictionary ``{"image": [C, *spatial]}`` (and, for segmentation,
    ``"mask": [1, *spatial]``) and returns it transformed; :class:`AugmentedDataset` does the
    packing. See the module docstring for what each level does.
    """
    level = resolve_level(level, task, samples)
    if level == "none":
        return None
    from monai.transforms import Compose

    segmentation = task == "segmentation"
    keys = (IMAGE_KEY, MASK_KEY) if segmentation else (IMAGE_KEY,)
    modes = ("bilinear", "nearest") if segmentation else ("bilinear",)
    steps = _image_2d(level, keys, modes) if samples == "image-2d" else _volume(level, keys, modes)
    compose = Compose(steps)
    compose.set_random_state(seed=int(torch.randint(2**31 - 1, (1,))))
    return compose  # type: ignore[no-any-return]


def _plain(value: Any) -> torch.Tensor:
    """A plain contiguous tensor (no MONAI metadata: Opacus and the collate want plain ones)."""
    tensor = torch.as_tensor(value)
    if type(tensor) is not torch.Tensor:
        tensor = tensor.as_subclass(torch.Tensor)  # a MetaTensor
    return tensor.contiguous()


def augment_view(transform: Transform, image: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One augmented view of ``image`` (and of ``mask`` with the same spatial transform).

    ``image`` is ``[C, *spatial]``; ``mask`` ``[*spatial]`` (integer classes). Returns plain
    tensors of the inputs' dtypes (the mask ``None`` when none was given).
    """
    item: dict[str, Any] = {IMAGE_KEY: image}
    if mask is not None:
        item[MASK_KEY] = mask.unsqueeze(0).float()
    out = transform(item)
    picture = _plain(out[IMAGE_KEY]).to(image.dtype)
    if mask is None:
        return picture, None
    return picture, _plain(out[MASK_KEY])[0].round().to(mask.dtype)


class AugmentedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A per-patient dataset whose items are augmented, one record at a time.

    Parameters
    ----------
    base : Dataset
        One record per patient, ``(image [C, *spatial], target)`` (a mask ``[*spatial]`` for
        segmentation).
    transform : callable
        From :func:`augment_transform`.
    segmentation : bool
        Whether ``target`` is a mask to transform with the image.
    """

    def __init__(self, base: Dataset[tuple[torch.Tensor, torch.Tensor]], transform: Transform,
                 *, segmentation: bool = False) -> None:
        self.base = base
        self.transform = transform
        self.segmentation = segmentation

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, target = self.base[index]
        picture, mask = augment_view(self.transform, image,
                                     target if self.segmentation else None)
        return picture, (mask if mask is not None else target)


def augment_dataset(dataset: Dataset[Any], level: str, task: str,
                    samples: str) -> Dataset[Any]:
    """``dataset`` with its records augmented at ``level`` (itself when there is nothing to do)."""
    transform = augment_transform(level, task, samples)
    if transform is None:
        return dataset
    return AugmentedDataset(dataset, transform, segmentation=task == "segmentation")
