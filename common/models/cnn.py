"""Starter 2D CNN that is DP-safe by construction.

Three convolution blocks (Conv -> GroupNorm -> ReLU, no in-place operations) followed by
adaptive average pooling, so any input side length of at least 16 pixels works, and a linear
classifier. GroupNorm replaces BatchNorm because BatchNorm mixes samples within a batch, which
breaks per-sample gradients and therefore DP-SGD (Opacus rejects it).
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["SmallCNN", "build_cnn"]

MIN_IMAGE_SIZE = 16
"""Smallest supported side length (three 2x poolings leave a 2x2 map)."""


_LAYERS: dict[int, tuple[type[nn.Module], type[nn.Module], type[nn.Module]]] = {
    2: (nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d),
    3: (nn.Conv3d, nn.MaxPool3d, nn.AdaptiveAvgPool3d),
}


def _block(in_channels: int, out_channels: int, groups: int, spatial_dims: int) -> nn.Sequential:
    conv, pool, _ = _LAYERS[spatial_dims]
    return nn.Sequential(
        conv(in_channels, out_channels, kernel_size=3, padding=1),
        nn.GroupNorm(groups, out_channels),
        nn.ReLU(inplace=False),
        pool(kernel_size=2),
    )


class SmallCNN(nn.Module):
    """Three conv blocks (16, 32, 32 channels), GroupNorm, adaptive pooling, linear head.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output logits.
    width : int, optional
        Channels of the first block; later blocks use ``2 * width``.
    spatial_dims : int, optional
        2 for images; 3 for volumes (:mod:`common.models.cnn3d` registers that variant).
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, *, width: int = 16,
        spatial_dims: int = 2,
    ) -> None:
        super().__init__()
        if spatial_dims not in _LAYERS:
            raise ConfigError(f"SmallCNN supports spatial_dims 2 or 3, got {spatial_dims}")
        wide = 2 * width
        self.features = nn.Sequential(
            _block(in_channels, width, groups=4, spatial_dims=spatial_dims),
            _block(width, wide, groups=8, spatial_dims=spatial_dims),
            _block(wide, wide, groups=8, spatial_dims=spatial_dims),
            _LAYERS[spatial_dims][2](1),
        )
        self.classifier = nn.Linear(wide, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` images or volumes to ``[B, num_classes]`` logits."""
        return self.classifier(torch.flatten(self.features(x), 1))


@register_model(
    "cnn",
    family="cnn",
    spatial_dims=(2,),
    tasks=("classification",),
    description="3-block GroupNorm CNN (16-32 channels), any image side >= 16; DP-safe",
    # Vesalius's own per-sample engine (client.training.per_sample) is the cheapest mode; the
    # DP/non-DP epoch CPU-time ratios per mode are in bench/RESULTS.md (--timing-only).
    grad_sample_mode="direct",
)
def build_cnn(
    *, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, spatial_dims: int = 2
) -> nn.Module:
    """Build :class:`SmallCNN`; see :func:`common.models.registry.build_model`."""
    if spatial_dims != 2:
        raise ConfigError(f"model 'cnn' is 2D only, got spatial_dims={spatial_dims}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"model 'cnn' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}; "
            "resize the images or choose another model"
        )
    return SmallCNN(in_channels=in_channels, num_classes=num_classes)
