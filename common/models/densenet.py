"""Small MONAI DenseNet with GroupNorm and out-of-place ReLU (DP-safe by construction).

:class:`monai.networks.nets.DenseNet` forwards ``norm`` and ``act`` to every layer, so passing
GroupNorm and ``inplace=False`` is enough. The configuration is a narrow three-block DenseNet
(growth 8, two layers per block, 16 initial features): every channel count is a multiple of 8,
so GroupNorm with 8 groups applies everywhere. The stem divides the side by 4 and each of the
two transitions by 2, so sides of 16 or more keep a non-empty map.
"""

from __future__ import annotations

from monai.networks.nets import DenseNet
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["build_densenet"]

MIN_IMAGE_SIZE = 16
"""Smallest side: the stem (/4) and two transitions (/2 each) must leave at least one pixel."""


@register_model(
    "densenet",
    family="cnn",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="MONAI DenseNet (3 blocks x 2 layers, growth 8, GroupNorm), side >= 16",
    # Cheapest measured mode: Vesalius's per-sample engine (client.training.per_sample);
    # per-mode DP/non-DP epoch CPU-time ratios are in bench/RESULTS.md (--timing-only).
    # (Opacus's "ew" fails on this net at a 16 px side: torch's ExpandedWeights conv backward
    # raises "view size is not compatible with input tensor's size and stride".)
    grad_sample_mode="direct",
)
def build_densenet(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build the small DP-safe MONAI DenseNet; see :mod:`common.models.densenet`."""
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"model 'densenet' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    return DenseNet(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=num_classes,
        init_features=16,
        growth_rate=8,
        block_config=(2, 2, 2),
        bn_size=2,
        act=("relu", {"inplace": False}),
        norm=("group", {"num_groups": 8}),
        dropout_prob=0.0,
    )
