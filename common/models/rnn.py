"""Recurrent networks (LSTM, GRU) reading an image row by row, or a volume slice by slice.

A 2D image ``[B, C, H, W]`` becomes a sequence of ``H`` steps of ``C * W`` features (its rows);
a volume ``[B, C, D, H, W]`` a sequence of ``D`` steps of ``C * H * W`` features (its slices).
The last hidden state feeds a linear classifier.

PyTorch's ``nn.LSTM``/``nn.GRU`` keep their weights in fused cuDNN-style parameters for which
Opacus computes no per-sample gradients; :class:`opacus.layers.DPLSTM` and
:class:`opacus.layers.DPGRU` are drop-in replacements built from ``nn.Linear`` cells, so
per-sample gradients come from the direct engine (:mod:`client.training.per_sample`), which
clips the cells' ``RNNLinear`` layers by ghost norms over all time steps at once
(:mod:`client.training.ghost`; 1.6x DP/non-DP epoch CPU time beside 5.2-5.6x for Opacus hooks
in the same run of ``bench/architectures.py --timing-only``).
"""

from __future__ import annotations

import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["RowRNN", "build_gru", "build_lstm"]

HIDDEN = 64
"""Hidden units of the recurrent layer."""

MAX_STEP_FEATURES = 32 * 32
"""Largest step input (one 32x32 slice); larger volumes should be downsampled first."""


class RowRNN(nn.Module):
    """Recurrent classifier over image rows (2D) or volume slices (3D).

    Parameters
    ----------
    step_features : int
        Features per step: ``C * W`` (2D) or ``C * H * W`` (3D).
    num_classes : int
        Output logits.
    cell : {"lstm", "gru"}
        Recurrent cell (Opacus DP layer).
    hidden : int, optional
        Hidden size.
    """

    def __init__(self, step_features: int, num_classes: int, *, cell: str, hidden: int = HIDDEN) -> None:
        super().__init__()
        self.cell = cell
        if cell == "lstm":
            self.rnn: nn.Module = DPLSTM(step_features, hidden, batch_first=True)
        elif cell == "gru":
            self.rnn = DPGRU(step_features, hidden, batch_first=True)
        else:
            raise ConfigError(f"cell must be 'lstm' or 'gru', got {cell!r}")
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` to ``[B, num_classes]`` logits via the last hidden state."""
        # [B, C, S0, ...] -> [B, S0, C * prod(rest)]: the first spatial axis is the time axis.
        steps = x.movedim(1, 2).flatten(2)
        outputs, _ = self.rnn(steps)
        return self.classifier(outputs[:, -1])


def _build(cell: str, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    step_features = in_channels * image_size ** (spatial_dims - 1)
    if step_features > MAX_STEP_FEATURES:
        raise ConfigError(
            f"model {cell!r} reads {step_features} features per step (> {MAX_STEP_FEATURES}); "
            "downsample the images or choose a convolutional model"
        )
    return RowRNN(step_features, num_classes, cell=cell)


@register_model(
    "lstm",
    family="rnn",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="Opacus DPLSTM (64 units) over image rows or volume slices",
    grad_sample_mode="direct",
)
def build_lstm(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build a :class:`RowRNN` with an LSTM cell."""
    return _build("lstm", in_channels, num_classes, image_size, spatial_dims)


@register_model(
    "gru",
    family="rnn",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="Opacus DPGRU (64 units) over image rows or volume slices",
    grad_sample_mode="direct",
)
def build_gru(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> nn.Module:
    """Build a :class:`RowRNN` with a GRU cell."""
    return _build("gru", in_channels, num_classes, image_size, spatial_dims)
