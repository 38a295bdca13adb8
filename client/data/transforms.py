"""MONAI array transforms: one 2-D float32 image in modality units -> tensor [1, S, S].

Pipeline (:func:`image_transform`):

1. ``EnsureChannelFirst(channel_dim="no_channel")`` adds the channel axis: [H, W] -> [1, H, W].
2. ``Resize((S, S), mode="area")``: area averaging is the anti-aliased choice when shrinking
   (the usual case: 256-512 px DICOM images to 28-64 px); it does not keep the aspect ratio.
   Resizing first also makes step 3 cheap (percentiles of S x S values, not of a full image).
3. ``ScaleIntensityRangePercentiles(1, 99, 0, 1, clip=True)`` per image: maps the 1st-99th
   percentile range of the image to [0, 1] and clips. Chosen over ``NormalizeIntensity``
   (z-score) because modality units differ by orders of magnitude between CT (Hounsfield,
   with -1000 air and metal outliers), MR (arbitrary) and X-ray, and percentiles are robust
   to the outliers that dominate a mean/std. When both percentiles coincide (e.g. more than
   99 % background) the image is min-max scaled instead; a constant image maps to 0.
4. ``EnsureType`` -> plain ``torch.float32`` tensor (no MONAI metadata, Opacus-friendly).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureType,
    Resize,
    ScaleIntensity,
    ScaleIntensityRangePercentiles,
)

ImageTransform = Callable[[npt.NDArray[np.float32]], torch.Tensor]

LOWER_PERCENTILE = 1.0
UPPER_PERCENTILE = 99.0


class RobustScale:
    """Percentile scaling to [0, 1] with a min-max fallback for degenerate images.

    Wraps MONAI's ``ScaleIntensityRangePercentiles`` (which divides by zero when the two
    percentiles coincide) and ``ScaleIntensity``.
    """

    def __init__(self, lower: float = LOWER_PERCENTILE, upper: float = UPPER_PERCENTILE) -> None:
        self.lower = lower
        self.upper = upper
        self._percentiles = ScaleIntensityRangePercentiles(
            lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True
        )
        self._minmax = ScaleIntensity(minv=0.0, maxv=1.0)

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        flat = torch.as_tensor(img, dtype=torch.float32).reshape(-1)
        lo, hi = torch.quantile(flat, torch.tensor([self.lower, self.upper]) / 100.0)
        if float(hi) > float(lo):
            return torch.as_tensor(self._percentiles(img))
        if float(flat.max()) > float(flat.min()):
            return torch.as_tensor(self._minmax(img))
        return torch.zeros_like(torch.as_tensor(img, dtype=torch.float32))


def image_transform(image_size: int) -> Compose:
    """Return the transform mapping a 2-D array to a float32 tensor ``[1, S, S]``.

    Parameters
    ----------
    image_size : int
        Output side ``S`` in pixels (>= 1).
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1 pixel, got {image_size}")
    return Compose(
        [
            EnsureChannelFirst(channel_dim="no_channel"),
            Resize((image_size, image_size), mode="area"),
            RobustScale(LOWER_PERCENTILE, UPPER_PERCENTILE),
            EnsureType(data_type="tensor", dtype=torch.float32, track_meta=False),
        ]
    )


def preprocess(image: npt.NDArray[np.float32], image_size: int) -> torch.Tensor:
    """Apply :func:`image_transform` to one image; return a contiguous ``[1, S, S]`` tensor."""
    out = image_transform(image_size)(np.asarray(image, dtype=np.float32))
    tensor = torch.as_tensor(out, dtype=torch.float32)
    return tensor.contiguous()
