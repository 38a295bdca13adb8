"""Small MONAI ResNet made DP-safe (GroupNorm, no in-place operations).

MONAI's :class:`monai.networks.nets.ResNet` (1.6) has two traps for Opacus:

* its residual blocks add the shortcut in place (``out += residual``) and use an in-place ReLU
  (the block's ``act`` is not forwarded by ``ResNet``), which breaks Opacus's backward hooks;
* ``ResNet._make_layer`` does not forward the ``norm`` argument, so blocks and the shortcut
  projections are built with BatchNorm whatever ``norm`` says.

:class:`DPResNetBlock` fixes the first by subclassing MONAI's block (same layers and weight
names, only the residual addition rewritten out of place and its own norm/act); the shortcut
projections' BatchNorm layers are swapped for GroupNorm right after construction
(:func:`_replace_batchnorm`). The network is ResNet-10-like (one block per stage), narrow and
without the stem's max-pool, which suits 28-32 px MedMNIST images.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from monai.networks.layers.utils import get_norm_layer
from monai.networks.nets import ResNet
from monai.networks.nets.resnet import ResNetBlock
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["DPResNetBlock", "build_resnet"]

NUM_GROUPS = 4
"""GroupNorm groups; divides every stage width of :data:`BLOCK_INPLANES`."""

BLOCK_INPLANES = (8, 16, 32, 64)
"""Channels of the four stages."""

MIN_IMAGE_SIZE = 8
"""Three stride-2 stages need at least an 8-pixel side to keep a non-empty map."""

NORM: tuple[str, dict[str, object]] = ("group", {"num_groups": NUM_GROUPS})
ACT: tuple[str, dict[str, object]] = ("relu", {"inplace": False})


class DPResNetBlock(ResNetBlock):
    """MONAI's basic residual block with GroupNorm, out-of-place ReLU and residual addition.

    Accepts (and ignores) the ``norm`` and ``act`` MONAI's ``ResNet`` passes, because that
    class passes BatchNorm regardless of its own ``norm`` argument.
    """

    def __init__(
        self,
        in_planes: int,
        planes: int,
        spatial_dims: int = 3,
        stride: int = 1,
        downsample: nn.Module | partial[torch.Tensor] | None = None,
        act: str | tuple[str, dict[str, object]] = ACT,
        norm: str | tuple[str, dict[str, object]] = NORM,
    ) -> None:
        del act, norm  # always the DP-safe choices below
        super().__init__(
            in_planes, planes, spatial_dims=spatial_dims, stride=stride,
            downsample=downsample, act=ACT, norm=NORM,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block with ``out = out + residual`` (not ``+=``, which Opacus rejects)."""
        out = self.bn1(self.conv1(x))
        out = self.act(out)
        out = self.bn2(self.conv2(out))
        residual = self.downsample(x) if self.downsample is not None else x
        return self.act(out + residual)  # type: ignore[no-any-return]


def _replace_batchnorm(module: nn.Module, spatial_dims: int) -> None:
    """Swap every BatchNorm child (recursively) for a GroupNorm of the same width."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, get_norm_layer(name=NORM, spatial_dims=spatial_dims,
                                                 channels=child.num_features))
        else:
            _replace_batchnorm(child, spatial_dims)


def _resnet(in_channels: int, num_classes: int, spatial_dims: int) -> nn.Module:
    block: Callable[..., nn.Module] = DPResNetBlock
    net = ResNet(
        block=block,  # type: ignore[arg-type]
        layers=[1, 1, 1, 1],
        block_inplanes=list(BLOCK_INPLANES),
        spatial_dims=spatial_dims,
        n_input_channels=in_channels,
        conv1_t_size=3,
        conv1_t_stride=1,
        no_max_pool=True,
        shortcut_type="B",
        num_classes=num_classes,
        act=ACT,
        norm=NORM,
    )
    _replace_batchnorm(net, spatial_dims)
    return net


@register_model(
    "resnet",
    family="cnn",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="MONAI ResNet-10-like (8-64 channels, GroupNorm, out-of-place residuals)",
    # Cheapest measured mode: Vesalius's per-sample engine (client.training.per_sample);
    # per-mode DP/non-DP epoch CPU-time ratios are in bench/RESULTS.md (--timing-only).
    grad_sample_mode="direct",
)
def build_resnet(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build the small DP-safe MONAI ResNet; see :mod:`common.models.resnet`."""
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"model 'resnet' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    return _resnet(in_channels, num_classes, spatial_dims)
