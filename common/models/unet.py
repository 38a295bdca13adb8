"""U-Net segmentation network (MONAI ``BasicUNet``) that is DP-safe by construction.

The network is MONAI's :class:`monai.networks.nets.BasicUNet` (Ronneberger, Fischer and Brox,
"U-Net: Convolutional Networks for Biomedical Image Segmentation", MICCAI 2015) with small
feature widths for 32-64 pixel inputs, and three choices that make it trainable with DP-SGD
under Opacus:

* ``norm=("group", {"num_groups": 4})``: GroupNorm works per sample (MONAI's default
  BatchNorm mixes samples and breaks per-sample gradients). InstanceNorm would also be
  per-sample but fails in training on the 1x1 bottleneck of a 16x16 input.
* ``act=("relu", {"inplace": False})``: MONAI defaults to an in-place LeakyReLU, which breaks
  Opacus's backward hooks.
* ``upsample="nontrainable"`` (interpolation + convolution) instead of transposed
  convolutions: Opacus 1.6 has no hooks-mode per-sample gradient sampler for
  ``ConvTranspose``, so it would fall back to functorch for those layers (correct but about
  10x slower per step, measured here on a 32x32 batch).

:meth:`SegmentationUNet.dp_loss` is MONAI's ``DiceCELoss`` with ``batch=False``: the Dice term
is computed per sample and averaged, and the cross-entropy term is the mean over voxels, so
each sample's term depends only on that sample (valid for per-sample clipping).
:func:`dice_score` reports per-sample Dice through ``monai.metrics.DiceMetric``.
"""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.nets import BasicUNet
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["FEATURES", "SegmentationUNet", "build_unet", "dice_score"]

FEATURES: tuple[int, int, int, int, int, int] = (8, 8, 16, 16, 32, 8)
"""BasicUNet widths: four encoder levels, the bottleneck and the last decoder level."""

NORM_GROUPS = 4
"""GroupNorm groups; divides every width in :data:`FEATURES`."""

MIN_IMAGE_SIZE = 16
"""Smallest side length (four 2x poolings leave a 1x1 bottleneck)."""


def _as_index_masks(masks: torch.Tensor, spatial_dims: int) -> torch.Tensor:
    """Return integer masks ``[B, 1, *spatial]`` from ``[B, *spatial]`` or ``[B, 1, *spatial]``."""
    if masks.dim() == spatial_dims + 1:
        masks = masks.unsqueeze(1)
    if masks.dim() != spatial_dims + 2 or masks.shape[1] != 1:
        raise ConfigError(
            f"masks must have shape [B, *spatial] or [B, 1, *spatial], got {tuple(masks.shape)}"
        )
    return masks.long()


class SegmentationUNet(nn.Module):
    """BasicUNet with GroupNorm, non-in-place ReLU and interpolation upsampling.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output channels (background included): per-voxel logits.
    spatial_dims : int, optional
        2 or 3.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 2, *, spatial_dims: int = 2
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        self.net = BasicUNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=num_classes,
            features=FEATURES,
            act=("relu", {"inplace": False}),
            norm=("group", {"num_groups": NORM_GROUPS}),
            dropout=0.0,
            upsample="nontrainable",
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` to per-voxel logits ``[B, num_classes, *spatial]``."""
        out: torch.Tensor = self.net(x)
        return out

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy, mean over the batch of per-sample terms.

        Parameters
        ----------
        inputs : torch.Tensor
            Images ``[B, C, *spatial]``.
        targets : torch.Tensor
            Integer masks ``[B, *spatial]`` or ``[B, 1, *spatial]`` with values in
            ``0..num_classes-1``.
        """
        loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=False, reduction="mean")
        out: torch.Tensor = loss(self(inputs), _as_index_masks(targets, self.spatial_dims))
        return out


def dice_score(logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per-sample Dice of the arg-max segmentation, averaged over the foreground classes.

    Parameters
    ----------
    logits : torch.Tensor
        ``[B, K, *spatial]`` per-voxel logits (``K >= 2``, class 0 is background).
    masks : torch.Tensor
        Integer masks ``[B, *spatial]`` or ``[B, 1, *spatial]``.

    Returns
    -------
    torch.Tensor
        float32 ``[B]``. A sample whose ground truth has no foreground scores 1 when the
        prediction has none either and 0 otherwise (``DiceMetric(ignore_empty=False)``).
    """
    num_classes = int(logits.shape[1])
    spatial_dims = logits.dim() - 2
    target = _as_index_masks(masks, spatial_dims)
    pred = logits.argmax(dim=1, keepdim=True)
    metric = DiceMetric(
        include_background=False, reduction="none", ignore_empty=False, num_classes=num_classes
    )
    per_class = torch.as_tensor(metric(pred, target))  # [B, K-1]
    metric.reset()
    return per_class.float().mean(dim=1)


@register_model(
    "unet",
    family="segmentation",
    spatial_dims=(2, 3),
    tasks=("segmentation",),
    description="MONAI BasicUNet (8-32 ch), GroupNorm, interpolation upsampling; Dice+CE",
)
def build_unet(
    *, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, spatial_dims: int = 2
) -> nn.Module:
    """Build :class:`SegmentationUNet`; see :func:`common.models.registry.build_model`."""
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"model 'unet' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}")
    return SegmentationUNet(in_channels, num_classes, spatial_dims=spatial_dims)
