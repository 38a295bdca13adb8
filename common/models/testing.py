"""Example batches for any registered model (used by the contract suite and the benchmark).

:func:`example_batch` returns a *learnable* synthetic batch matching a :class:`ModelSpec`:
Gaussian noise images in which class ``k`` adds a class-specific bright pattern, so that a
short training run can reduce the loss; for segmentation models the target is the mask of a
bright square. Synthetic only: no real data, no PHI.
"""

from __future__ import annotations

import torch

from common.errors import ConfigError
from common.models.registry import ModelSpec

__all__ = ["example_batch", "example_spatial_dims", "is_segmentation"]

SIGNAL = 1.5
"""Amplitude of the class (or lesion) pattern added to unit-variance noise."""


def is_segmentation(spec: ModelSpec) -> bool:
    """True when the model's forward returns per-voxel logits (segmentation-only models)."""
    return "segmentation" in spec.tasks and "classification" not in spec.tasks


def example_spatial_dims(spec: ModelSpec) -> int:
    """Spatial dims used for examples: 2 if the model supports images, else its first."""
    return 2 if 2 in spec.spatial_dims else spec.spatial_dims[0]


def example_batch(
    spec: ModelSpec,
    *,
    batch_size: int = 4,
    image_size: int = 16,
    num_classes: int = 2,
    in_channels: int = 1,
    spatial_dims: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return a learnable synthetic ``(inputs, targets)`` batch for ``spec``.

    Parameters
    ----------
    spec : ModelSpec
        The model's registry entry.
    batch_size : int, optional
        Samples in the batch.
    image_size : int, optional
        Side length of every spatial axis.
    num_classes : int, optional
        Classes (segmentation: background plus ``num_classes - 1`` lesion classes).
    in_channels : int, optional
        Image channels.
    spatial_dims : int, optional
        2 or 3; default :func:`example_spatial_dims`.
    seed : int, optional
        Seed of a private generator (the global RNG is untouched).

    Returns
    -------
    inputs : torch.Tensor
        ``[B, in_channels, *([image_size] * spatial_dims)]`` float32.
    targets : torch.Tensor
        ``[B]`` int64 class ids, or ``[B, *spatial]`` int64 masks for segmentation models.

    Raises
    ------
    ConfigError
        If ``spatial_dims`` is not supported by the model or sizes are invalid.
    """
    dims = example_spatial_dims(spec) if spatial_dims is None else spatial_dims
    if dims not in spec.spatial_dims:
        raise ConfigError(f"model {spec.name!r} supports spatial_dims {spec.spatial_dims}, not {dims}")
    if batch_size < 1 or image_size < 4 or num_classes < 2:
        raise ConfigError("need batch_size >= 1, image_size >= 4 and num_classes >= 2")
    gen = torch.Generator().manual_seed(seed)
    spatial = (image_size,) * dims
    inputs = torch.randn(batch_size, in_channels, *spatial, generator=gen)
    labels = torch.randint(0, num_classes, (batch_size,), generator=gen)
    if is_segmentation(spec):
        return _add_lesions(inputs, labels, gen)
    # Class k brightens the k-th of num_classes bands along the first spatial axis (class 0
    # has no band), a pattern every family (dense, convolutional, recurrent over rows) can see.
    band = max(1, image_size // num_classes)
    for k in range(1, num_classes):
        rows = slice(k * band, min(image_size, (k + 1) * band))
        inputs[labels == k, :, rows] += SIGNAL
    return inputs, labels


def _add_lesions(
    inputs: torch.Tensor, labels: torch.Tensor, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one bright cube of class ``labels[i]`` per image (class 0: none); return masks."""
    size = inputs.shape[-1]
    dims = inputs.ndim - 2
    masks = torch.zeros((inputs.shape[0],) + (size,) * dims, dtype=torch.long)
    side = max(2, size // 3)
    for i, label in enumerate(labels.tolist()):
        if label == 0:
            continue
        corner = torch.randint(0, size - side + 1, (dims,), generator=gen).tolist()
        region = tuple(slice(c, c + side) for c in corner)
        masks[(i, *region)] = label
        inputs[(i, slice(None), *region)] += SIGNAL * label
    return inputs, masks
