"""A shared U-Net trunk with two heads: a lesion mask and whether the image holds a lesion.

:class:`MultiTaskUNet` is the zoo's U-Net (MONAI ``BasicUNet`` with the DP-safe choices of
:mod:`common.models.unet`: GroupNorm, non-in-place ReLU, interpolation upsampling) whose
encoder feeds a second head: the bottleneck features, averaged over space, go through one
linear layer to two logits, "no lesion" / "lesion present" (Caruana, "Multitask learning",
Mach. Learn. 1997: hard parameter sharing). ``forward`` returns the segmentation logits, so
the model is a segmentation model everywhere a segmentation model is expected (evaluation,
the pooled Dice inference); :meth:`MultiTaskUNet.heads` returns both heads' logits from one
pass through the trunk, and :meth:`MultiTaskUNet.multi_task_loss_per_sample` their weighted
per-sample loss, which the multi-task paradigm trains with its options' weights
(:mod:`client.paradigms.multi_task`) and ``dp_loss`` with the default weights.

DP: every layer with parameters is a ``Conv2d``, ``GroupNorm`` or ``Linear`` and nothing
couples rows of a batch, so both heads' outputs for a row depend on that row only. The model
is registered with Opacus's "hooks" mode, like the U-Net; the "direct" per-sample engine
(:mod:`client.training.per_sample`) gives the same per-sample gradients of the multi-task
loss (tested) and trains it when asked (``grad_sample_mode="direct"``), but the registry's
direct-model check scores classifiers (``[B]`` class targets), not mask heads.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigError
from common.models.registry import register_model
from common.models.unet import MIN_IMAGE_SIZE, SegmentationUNet

__all__ = ["MULTI_TASK_FAMILY", "PRESENCE_CLASSES", "PRESENCE_WEIGHT", "SEGMENTATION_WEIGHT",
           "MultiTaskUNet", "build_multi_task_unet", "is_multi_task_model", "presence_targets"]

MULTI_TASK_FAMILY = "multi-task"
"""Model family of the trunk-plus-heads models."""

PRESENCE_CLASSES = 2
"""Logits of the presence head: no lesion, lesion."""

SEGMENTATION_WEIGHT = 1.0
PRESENCE_WEIGHT = 0.5
"""Default loss weights of the two heads (``--paradigm multi-task`` options override them)."""


class MultiTaskUNet(nn.Module):
    """U-Net trunk with a segmentation head and an image-level lesion-presence head.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Segmentation classes (background included).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2) -> None:
        super().__init__()
        self.unet = SegmentationUNet(in_channels, num_classes, spatial_dims=2)
        bottleneck = self.unet.net.down_4.convs.conv_1.conv.out_channels
        self.presence_head = nn.Linear(bottleneck, PRESENCE_CLASSES)

    def heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(segmentation [B, K, H, W], presence [B, 2])`` logits of images ``[B, C, H, W]``.

        The same computation as MONAI's ``BasicUNet.forward``, keeping the bottleneck.
        """
        net = self.unet.net
        x0 = net.conv_0(x)
        x1 = net.down_1(x0)
        x2 = net.down_2(x1)
        x3 = net.down_3(x2)
        x4 = net.down_4(x3)
        u4 = net.upcat_4(x4, x3)
        u3 = net.upcat_3(u4, x2)
        u2 = net.upcat_2(u3, x1)
        u1 = net.upcat_1(u2, x0)
        segmentation: torch.Tensor = net.final_conv(u1)
        presence: torch.Tensor = self.presence_head(x4.mean(dim=(2, 3)))
        return segmentation, presence

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Segmentation logits ``[B, K, H, W]`` (the model's primary task)."""
        return self.heads(x)[0]

    def multi_task_loss_per_sample(self, inputs: torch.Tensor, targets: torch.Tensor, *,
                                   segmentation_weight: float = SEGMENTATION_WEIGHT,
                                   presence_weight: float = PRESENCE_WEIGHT) -> torch.Tensor:
        """``[B]``: each row's weighted sum of the two heads' losses, from that row only.

        ``segmentation_weight`` x the segmentation task's per-sample loss (voxel-mean
        cross-entropy + soft Dice, :mod:`common.tasks.segmentation`) of the mask head, plus
        ``presence_weight`` x the cross-entropy of the presence head against
        :func:`presence_targets` of the row's own mask ``targets`` ``[B, H, W]``.
        """
        from common.tasks.segmentation import SEGMENTATION

        segmentation, presence = self.heads(inputs)
        masks = targets.long()
        seg = SEGMENTATION.per_sample_loss(segmentation, masks)
        pres = F.cross_entropy(presence, presence_targets(masks), reduction="none")
        return segmentation_weight * seg + presence_weight * pres

    def dp_loss_per_sample(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Both heads at the default weights, per sample (a run without ``--paradigm
        multi-task`` still trains both heads)."""
        return self.multi_task_loss_per_sample(inputs, targets)

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean of :meth:`dp_loss_per_sample` over the batch."""
        return self.dp_loss_per_sample(inputs, targets).mean()

    @torch.no_grad()
    def presence_probability(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` probability that each image holds a lesion (no gradients)."""
        return torch.softmax(self.heads(x)[1], dim=1)[:, 1]


def presence_targets(masks: torch.Tensor) -> torch.Tensor:
    """``[B]`` int64: 1 where a sample's mask ``[B, *spatial]`` has a foreground pixel."""
    return (masks.flatten(1) >= 1).any(dim=1).long()


def is_multi_task_model(model: nn.Module) -> bool:
    """True for a :class:`MultiTaskUNet`, possibly wrapped by a DP engine (``_module``)."""
    return isinstance(getattr(model, "_module", model), MultiTaskUNet)


@register_model(
    "multi-task-unet",
    family=MULTI_TASK_FAMILY,
    spatial_dims=(2,),
    tasks=("segmentation",),
    description="U-Net trunk, two heads: lesion mask + lesion present (--paradigm multi-task)",
    grad_sample_mode="hooks",
)
def build_multi_task_unet(*, in_channels: int, num_classes: int, image_size: int,
                          spatial_dims: int) -> nn.Module:
    """Build a :class:`MultiTaskUNet` (2D images of side ``>= 16``)."""
    if spatial_dims != 2:
        raise ConfigError("multi-task-unet reads 2D images (--samples image-2d)")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"multi-task-unet needs --image-size >= {MIN_IMAGE_SIZE}, "
                          f"got {image_size}")
    return MultiTaskUNet(in_channels, num_classes)
