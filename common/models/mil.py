"""Attention-based multi-instance learning (MIL): a study's volume as a bag of its slices.

The label belongs to the whole bag (the study), not to any slice. Each slice (instance) is
embedded on its own by a small convolutional encoder; an attention network scores every
embedding, a softmax over the slices of the bag turns the scores into weights that sum to 1,
and the weighted sum of the embeddings feeds a linear classifier (Ilse, Tomczak & Welling,
"Attention-based deep multiple instance learning", ICML 2018; ``gated=True`` is their gated
attention, ``tanh(V h) * sigmoid(U h)``).

DP: one bag is one record. The encoder's convolutions have a kernel depth of 1
(``Conv3d`` with kernel ``(1, 3, 3)``), so every slice is encoded independently and the
batch axis is never reshaped: Opacus's hooks see ``[B, ...]`` activations in every layer and
compute true per-bag gradients; the attention softmax mixes slices *within* a bag only, so
no row's output depends on another row. No BatchNorm and no in-place operations; the
embeddings are normalised per instance (``LayerNorm``).

:meth:`AttentionMIL.attention` returns the per-slice weights of a batch of bags. They are a
node-local view of its own studies (``vesalius node attention``) and are never sent.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.registry import register_model

__all__ = ["AttentionMIL", "build_mil_attention", "is_mil_model"]

WIDTH = 16
"""Channels of the slice encoder's convolutions."""

EMBED = 32
"""Features of one instance embedding."""

ATTENTION = 32
"""Hidden units of the attention network."""


class AttentionMIL(nn.Module):
    """Attention-pooled classifier over the slices of a volume.

    Parameters
    ----------
    in_channels : int
        Image channels.
    num_classes : int
        Output logits.
    gated : bool, optional
        Gated attention (``tanh(V h) * sigmoid(U h)``) instead of ``tanh(V h)``.
    width, embed, attention : int, optional
        Encoder channels, embedding size and attention hidden size.
    """

    def __init__(self, in_channels: int, num_classes: int, *, gated: bool = True,
                 width: int = WIDTH, embed: int = EMBED, attention: int = ATTENTION) -> None:
        super().__init__()
        slice_kernel, pad = (1, 3, 3), (0, 1, 1)
        self.encoder = nn.Sequential(
            nn.Conv3d(in_channels, width, slice_kernel, padding=pad),
            nn.ReLU(),
            nn.Conv3d(width, width, slice_kernel, padding=pad, stride=(1, 2, 2)),
            nn.ReLU(),
            nn.Conv3d(width, embed, slice_kernel, padding=pad, stride=(1, 2, 2)),
            nn.ReLU(),
        )
        self.norm = nn.LayerNorm(embed)
        self.attention_v = nn.Linear(embed, attention)
        self.attention_u = nn.Linear(embed, attention) if gated else None
        self.attention_w = nn.Linear(attention, 1)
        self.classifier = nn.Linear(embed, num_classes)

    def instances(self, x: torch.Tensor) -> torch.Tensor:
        """Per-slice embeddings ``[B, D, E]`` of bags ``[B, C, D, H, W]``."""
        features = self.encoder(x).mean(dim=(3, 4))  # [B, E, D]: each slice on its own
        return self.norm(features.transpose(1, 2))

    def attention_weights(self, h: torch.Tensor) -> torch.Tensor:
        """Softmax weights ``[B, D]`` over the instances ``h`` ``[B, D, E]`` of each bag."""
        hidden = torch.tanh(self.attention_v(h))
        if self.attention_u is not None:
            hidden = hidden * torch.sigmoid(self.attention_u(h))
        return torch.softmax(self.attention_w(hidden).squeeze(-1), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map bags ``[B, C, D, H, W]`` to logits ``[B, num_classes]``."""
        h = self.instances(x)
        weights = self.attention_weights(h)
        pooled = (weights.unsqueeze(-1) * h).sum(dim=1)
        return self.classifier(pooled)

    @torch.no_grad()
    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The slice weights ``[B, D]`` of bags ``x`` (each row sums to 1); no gradients."""
        return self.attention_weights(self.instances(x))


def is_mil_model(model: nn.Module) -> bool:
    """True for a model (possibly wrapped by Opacus) with attention over instances."""
    return isinstance(getattr(model, "_module", model), AttentionMIL)


@register_model(
    "mil-attention",
    family="mil",
    spatial_dims=(3,),
    tasks=("classification",),
    description="attention MIL (Ilse et al. 2018, gated): a volume as a bag of its slices",
    grad_sample_mode="hooks",
)
def build_mil_attention(*, in_channels: int, num_classes: int, image_size: int,
                        spatial_dims: int) -> nn.Module:
    """Build a gated :class:`AttentionMIL` (``image_size`` only sets the slice count)."""
    return AttentionMIL(in_channels, num_classes, gated=True)
