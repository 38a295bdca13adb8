"""Fully connected network (DNN / multi-layer perceptron) on flattened pixels.

The simplest family of the review: the image (2D) or volume (3D) is flattened and fed through
hidden ``Linear -> ReLU`` layers to a linear classifier. Only ``nn.Linear`` carries weights,
so every Opacus per-sample gradient mode supports it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["MLP", "build_mlp"]

MAX_INPUTS = 32**3
"""Largest flattened input (a 32-voxel cube); larger inputs would make the first layer huge."""


class MLP(nn.Module):
    """Flatten, hidden ``Linear -> ReLU`` layers, linear classifier.

    Parameters
    ----------
    in_features : int
        Flattened input size ``C * prod(spatial)``.
    num_classes : int
        Output logits.
    hidden : sequence of int, optional
        Widths of the hidden layers.
    """

    def __init__(self, in_features: int, num_classes: int, *, hidden: Sequence[int] = (128, 64)) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU(inplace=False)]
            width = h
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` inputs to ``[B, num_classes]`` logits."""
        return self.classifier(self.features(x))


@register_model(
    "mlp",
    family="mlp",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="DNN: flattened pixels -> 128 -> 64 -> logits (ReLU); 2D or 3D",
    # The direct engine's ghost norms for Linear layers (client.training.ghost): 1.9x DP/non-DP
    # epoch CPU time beside 2.5x for Opacus "ghost" in the same run (bench/architectures.py
    # --timing-only, PneumoniaMNIST, batch 64, loaded machine).
    grad_sample_mode="direct",
)
def build_mlp(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build :class:`MLP` for ``[B, in_channels, *([image_size] * spatial_dims)]`` inputs."""
    in_features = in_channels * image_size**spatial_dims
    if in_features > MAX_INPUTS:
        raise ConfigError(
            f"model 'mlp' takes at most {MAX_INPUTS} input values, got {in_features}; "
            "downsample the images or choose a convolutional model"
        )
    return MLP(in_features, num_classes)
