"""Resample a :class:`~client.dicom.volume.Volume` to a voxel size or a grid shape with MONAI.

The volume becomes a channel-first :class:`monai.data.MetaTensor` ``[1, slices, rows, cols]``
whose affine is :attr:`Volume.affine` (index to patient mm). Then

* a target **spacing** goes through :class:`monai.transforms.Spacing` with
  ``diagonal=False``: the orientation is kept, the first voxel centre stays at the origin and
  the extent is covered with the new step;
* a target **shape** goes through :class:`monai.transforms.Resize`, which scales the affine
  so that the same physical extent (voxel corners) is covered.

Spacing, direction and origin of the result are read back from MONAI's output affine, so
the result's geometry is exactly what MONAI computed. Use ``interpolation="nearest"`` for
masks. The result's ``sop_instance_uids`` is empty: its slices are no longer source slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Resize, Spacing

from client.dicom.volume import Volume

Interpolation = Literal["linear", "nearest"]
_SPACING_MODE = {"linear": "bilinear", "nearest": "nearest"}
_RESIZE_MODE = {"linear": "trilinear", "nearest": "nearest-exact"}


def _validated(values: Sequence[float], what: str, *, integer: bool) -> tuple[float, ...]:
    items = tuple(float(v) for v in values)
    if len(items) != 3 or not all(np.isfinite(v) and v > 0 for v in items):
        raise ValueError(f"{what} must be three positive numbers (z, y, x)")
    if integer and not all(v.is_integer() for v in items):
        raise ValueError(f"{what} must be three positive integers (slices, rows, cols)")
    return items


def resample_volume(
    volume: Volume,
    *,
    spacing_mm: Sequence[float] | None = None,
    shape: Sequence[int] | None = None,
    interpolation: Interpolation = "linear",
) -> Volume:
    """Return ``volume`` resampled to ``spacing_mm`` (z, y, x) or to ``shape``.

    Parameters
    ----------
    volume : Volume
        From :func:`client.dicom.volume.load_volume`.
    spacing_mm : Sequence[float] | None, keyword-only
        Target voxel size ``(dz, dy, dx)`` in mm (:class:`monai.transforms.Spacing`).
    shape : Sequence[int] | None, keyword-only
        Target grid ``(slices, rows, cols)`` (:class:`monai.transforms.Resize`).
    interpolation : {"linear", "nearest"}, keyword-only
        Trilinear for images, nearest for label masks.

    Returns
    -------
    Volume
        float32 array, geometry from MONAI's output affine.

    Raises
    ------
    ValueError
        Not exactly one of ``spacing_mm`` and ``shape``, or a non-positive value.
    """
    if (spacing_mm is None) == (shape is None):
        raise ValueError("give exactly one of spacing_mm and shape")
    if interpolation not in _SPACING_MODE:
        raise ValueError("interpolation must be 'linear' or 'nearest'")
    image = MetaTensor(
        torch.as_tensor(np.ascontiguousarray(volume.array, dtype=np.float32))[None],
        affine=torch.as_tensor(volume.affine, dtype=torch.float64),
    )
    if spacing_mm is not None:
        target = _validated(spacing_mm, "spacing_mm", integer=False)
        transform = Spacing(
            pixdim=target,
            diagonal=False,
            mode=_SPACING_MODE[interpolation],
            padding_mode="border",
            dtype=np.float64,
        )
        out = transform(image)
    else:
        size = tuple(int(v) for v in _validated(shape or (), "shape", integer=True))
        out = Resize(spatial_size=size, mode=_RESIZE_MODE[interpolation])(image)
    affine = np.asarray(out.affine, dtype=np.float64)  # type: ignore[union-attr]
    scale = np.linalg.norm(affine[:3, :3], axis=0)
    return Volume(
        array=np.asarray(out[0], dtype=np.float32),
        spacing=(float(scale[0]), float(scale[1]), float(scale[2])),
        direction=affine[:3, :3] / scale[None, :],
        origin=affine[:3, 3].copy(),
        group_uid=volume.group_uid,
    )
