"""3D CNN for volumes (CT/MR series, AdrenalMNIST3D's 28^3 cubes), DP-safe by construction.

The 3D sibling of :mod:`common.models.cnn`: three ``Conv3d -> GroupNorm -> ReLU -> MaxPool3d``
blocks (no in-place operations, no BatchNorm), global average pooling and a linear head.
Narrow (8-16 channels) because 3D convolutions and their per-sample gradients are costly on
CPU.
"""

from __future__ import annotations

from torch import nn

from common.errors import ConfigError
from common.models.cnn import SmallCNN
from common.models.registry import register_model

__all__ = ["SmallCNN3D", "build_cnn3d"]

MIN_IMAGE_SIZE = 8
"""Smallest supported side (three 2x poolings)."""


class SmallCNN3D(SmallCNN):
    """Three 3D conv blocks (8, 16, 16 channels), GroupNorm, global pooling, linear head.

    :class:`~common.models.cnn.SmallCNN` with ``spatial_dims=3`` and a narrower default
    width; maps ``[B, C, D, H, W]`` volumes to ``[B, num_classes]`` logits.
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *, width: int = 8) -> None:
        super().__init__(in_channels, num_classes, width=width, spatial_dims=3)


@register_model(
    "cnn3d",
    family="cnn",
    spatial_dims=(3,),
    tasks=("classification",),
    description="3-block GroupNorm 3D CNN (8-16 channels) for volumes, side >= 8",
    # Cheapest measured mode on AdrenalMNIST3D (28^3, batch 64, 256 volumes): DP/non-DP epoch
    # CPU time 1.31x with Vesalius's engine (client.training.per_sample) vs 2.08x (ew),
    # 2.49x (hooks); bench/architectures.py --timing-only, figures in bench/RESULTS.md.
    grad_sample_mode="direct",
)
def build_cnn3d(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build :class:`SmallCNN3D`; see :func:`common.models.registry.build_model`."""
    if spatial_dims != 3:
        raise ConfigError(f"model 'cnn3d' is for volumes (spatial_dims=3), got {spatial_dims}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"model 'cnn3d' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    return SmallCNN3D(in_channels=in_channels, num_classes=num_classes)
