"""Ghost norms for linear layers: per-sample gradient norms and clipped sums without the
per-sample gradients ("book-keeping", Bu et al. 2023; ghost clipping, Li et al. 2022).

A linear layer ``y = x W^T + b`` applied to ``T`` rows of sample ``i`` (``T = 1`` for a plain
``[n, in]`` input; the positions of a sequence ``[n, ..., in]``; or the ``T`` uses of a layer
called several times in one forward pass, such as an RNN cell over time steps, stacked) has
the per-sample gradients ``G_i^T X_i`` (weight, ``G_i``: ``[T, out]`` output gradients,
``X_i``: ``[T, in]`` inputs) and ``sum_t G_i[t]`` (bias). Their squared norms are

* ``T = 1``: ``|g_i|^2 |x_i|^2`` (an outer product's norm), ``O(n (in + out))``;
* else ``sum((G_i G_i^T) * (X_i X_i^T))`` (the two Gram matrices), ``O(n T^2 (in + out))``,
  or, when that is more, the norm of ``G_i^T X_i`` formed one layer at a time and dropped,
  ``O(n T in out)``;

and the clipped sum ``sum_i f_i G_i^T X_i`` is one matrix product of the factor-weighted
output gradients with the inputs, as plain training's weight gradient is. Nothing of size
``n * in * out`` is kept: :class:`GhostLinear` holds the layer's inputs and output gradients
(which the backward pass had anyway) until the optimiser has clipped.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import nn

__all__ = [
    "CONV_MIN_WEIGHTS", "GhostConv", "GhostLinear", "GhostRows", "conv_keeps_output_gradients",
    "ghost_record",
]


class _GhostRecord:
    """What the optimiser reads of a ghost-clipped layer: each parameter's ``[n]`` squared
    per-sample norms and its clipped sum. Subclasses set ``weight_sq``, ``bias_sq`` and
    ``_g_sum`` (the per-sample bias gradients, ``[n, out]``) and form the weight's sum."""

    weight: nn.Parameter
    bias: nn.Parameter | None
    weight_sq: torch.Tensor
    bias_sq: torch.Tensor | None
    _g_sum: torch.Tensor | None

    def squared_norms(self, p: nn.Parameter) -> torch.Tensor:
        """``[n]`` squared per-sample gradient norms of ``p`` (the weight or the bias)."""
        if p is self.weight:
            return self.weight_sq
        if p is self.bias and self.bias_sq is not None:
            return self.bias_sq
        raise KeyError("not a parameter of this layer")

    def clipped_sum(self, p: nn.Parameter, factor: torch.Tensor, out: torch.Tensor) -> None:
        """Write ``sum_i factor_i * (per-sample gradient of p)_i`` into ``out`` (``p``'s shape)."""
        if p is self.weight:
            self._weight_sum(factor, out)
        elif p is self.bias and self._g_sum is not None:
            torch.mv(self._g_sum.t(), factor.to(self._g_sum.dtype), out=out)
        else:
            raise KeyError("not a parameter of this layer")

    def _weight_sum(self, factor: torch.Tensor, out: torch.Tensor) -> None:
        raise NotImplementedError


class GhostLinear(_GhostRecord):
    """One backward pass's inputs and output gradients of a linear layer, for ghost clipping.

    Parameters
    ----------
    layer : torch.nn.Linear
        The layer (its ``weight`` and ``bias`` are the parameters described).
    x : torch.Tensor
        ``[n, T, in]`` inputs of every use of the layer in the pass, stacked on axis 1.
    g : torch.Tensor
        ``[n, T, out]`` gradients of the loss's per-sample terms with respect to its outputs.
    owned : bool, optional
        True if ``g`` is this record's own tensor (stacked from several uses), which the
        clipped sum may then scale in place; autograd may hand the same output-gradient
        tensor to several layers (the two inputs of a sum), so a tensor it gave is copied.
    """

    def __init__(self, layer: nn.Linear, x: torch.Tensor, g: torch.Tensor, owned: bool = False) -> None:
        self.weight = layer.weight
        self.bias = layer.bias
        self.x, self.g, self._owned = x, g, owned
        n, steps, width_in = x.shape
        width_out = g.shape[-1]
        if steps == 1:  # an outer product's norm; its bias's is |g|
            g_sq = torch.linalg.vector_norm(g.view(n, width_out), dim=1).square_()
            self.weight_sq = g_sq * torch.linalg.vector_norm(x.view(n, width_in), dim=1).square_()
            self._g_sum = g.view(n, width_out) if self.bias is not None else None
            self.bias_sq = g_sq if self.bias is not None else None
            self._owned = False  # _g_sum is a view of g: the weight's sum must not scale it
            return
        if steps * (width_in + width_out) <= 2 * width_in * width_out:
            # up to twice the flops of the product below, for far less memory (T^2 vs in*out)
            self.weight_sq = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
        else:
            self.weight_sq = torch.bmm(g.transpose(1, 2), x).square().sum((1, 2))
        self._g_sum = g.sum(1) if self.bias is not None else None
        self.bias_sq = None if self._g_sum is None else self._g_sum.square().sum(1)

    def _weight_sum(self, factor: torch.Tensor, out: torch.Tensor) -> None:
        # in place when g is ours: the record is clipped once (Opacus's processed flag) and
        # its norms and bias sums were taken at construction, so g is not read again
        scale = factor.to(self.g.dtype).view(-1, 1, 1)
        weighted = self.g.mul_(scale) if self._owned else self.g * scale
        torch.mm(weighted.reshape(-1, self.g.shape[-1]).t(), self.x.reshape(-1, self.x.shape[-1]), out=out)


class GhostRows(_GhostRecord):
    """One layer's records of a step run as several physical batches (consecutive rows of
    the step's samples): their norms stacked, their clipped sums added, each record with its
    own rows' factors.

    Parameters
    ----------
    records : list of records
        One per physical batch, in row order, all of the same layer.
    """

    def __init__(self, records: list[_GhostRecord]) -> None:
        first = records[0]
        self.weight, self.bias, self._records = first.weight, first.bias, records
        self.weight_sq = torch.cat([r.weight_sq for r in records])
        self.bias_sq = None if first.bias_sq is None else torch.cat(
            [cast(torch.Tensor, r.bias_sq) for r in records])
        self._g_sum = None  # the bias's sum is the records' too (clipped_sum below)

    def clipped_sum(self, p: nn.Parameter, factor: torch.Tensor, out: torch.Tensor) -> None:
        part = torch.empty_like(out)
        start = 0
        for k, record in enumerate(self._records):
            rows = record.weight_sq.shape[0]
            record.clipped_sum(p, factor[start:start + rows], out if k == 0 else part)
            if k:
                out.add_(part)
            start += rows


def ghost_record(t: torch.Tensor | None) -> _GhostRecord | None:
    """The :class:`GhostLinear`, :class:`GhostConv` or :class:`GhostRows` behind
    ``p.grad_sample`` ``t``, or None for a real one."""
    return getattr(t, "_ghost_linear", None)


CONV_MIN_WEIGHTS = 4096
"""Smallest convolution (weights) that may keep its output gradients instead of its
per-sample gradients (16 KiB a sample in float32)."""


def conv_keeps_output_gradients(layer: Any, output: torch.Tensor) -> str | None:
    """How the direct engine should clip a convolution with this per-sample ``output``:
    ``"gram"`` or ``"sample"`` (a :class:`GhostConv`: keep its output gradients until the
    optimiser step) or None (keep its per-sample gradients in the engine's buffer).

    What a layer keeps until the step is the smaller of its output gradients (``out * T``
    values a sample, ``T`` output positions) and its per-sample gradients (``P`` values, the
    weight's size): a layer with a small map and many weights (ResNet's and DenseNet's last
    stages: 64 x 64 x 3 x 3 weights on a 4 x 4 map) keeps ``out * T``. Its norms are then
    either the Gram form (``"gram"``, when ``T^2 (in k + out) <= T out in k``, the cost of
    forming the per-sample gradients) or the per-sample gradients formed one layer at a time
    and dropped (``"sample"``). Layers of fewer than :data:`CONV_MIN_WEIGHTS` weights keep
    their per-sample gradients: their columns are small, and the record's dozen operations a
    step cost more than they save (DenseNet's 20 small layers: 1.74 -> 1.91 times the plain
    epoch when all took it).
    """
    if output.dim() < 3 or layer.groups != 1 or layer.weight.numel() < CONV_MIN_WEIGHTS:
        return None
    positions = math.prod(output.shape[2:])
    out_channels = layer.weight.shape[0]
    fan_in = layer.weight[0].numel()  # in/groups * prod(kernel)
    if out_channels * positions >= layer.weight.numel():
        return None
    return "gram" if positions * (fan_in + out_channels) <= out_channels * fan_in else "sample"


class GhostConv(_GhostRecord):
    """One backward pass's inputs and output gradients of a convolution, for clipping.

    The same contract as :class:`GhostLinear` (``squared_norms``, ``clipped_sum``) for a
    convolution that keeps its output gradients instead of its per-sample gradients (see
    :func:`conv_keeps_output_gradients`). With ``x_i`` unfolded to ``A_i`` (``[in k, T]``)
    and ``G_i`` the ``[out, T]`` output gradients, the per-sample weight gradient is
    ``G_i A_i^T`` and its squared norm ``sum((A_i^T A_i) * (G_i^T G_i))`` (the ``"gram"``
    method: two ``[T, T]`` Gram matrices a sample); the ``"sample"`` method forms the
    per-sample gradients with ``sample_grads`` and keeps only their norms. The clipped sum
    ``sum_i f_i G_i A_i^T`` is one weight gradient of the convolution with the output
    gradients scaled by ``f_i`` (``torch.ops.aten.convolution_backward``), as plain training
    computes its weight gradient. A layer used several times in a pass (tied) sums its uses'
    per-sample gradients, so its norms take the ``"sample"`` method.

    Parameters
    ----------
    layer : torch.nn.Conv1d, Conv2d or Conv3d
        The layer (its ``weight`` and ``bias`` are the parameters described).
    uses : list of (torch.Tensor, torch.Tensor)
        ``(x, g)`` per use: its input ``[n, in, *spatial]`` and the gradients of the loss's
        per-sample terms with respect to its output ``[n, out, *spatial']``.
    padding : tuple of int
        The layer's symmetric zero padding.
    method : {"gram", "sample"}
    columns : callable
        ``columns(layer, x)``: the unfolded input ``[n, in k, T]``.
    sample_grads : callable
        ``sample_grads(layer, x, g)``: per-sample gradients ``{weight: [n, *shape], ...}``.
    """

    @torch.no_grad()  # the weights are back in autograd by now; nothing here needs a graph
    def __init__(
        self, layer: Any, uses: list[tuple[torch.Tensor, torch.Tensor]], padding: tuple[int, ...],
        method: str, columns: Callable[[Any, torch.Tensor], torch.Tensor],
        sample_grads: Callable[[Any, torch.Tensor, torch.Tensor], dict[nn.Parameter, torch.Tensor]],
    ) -> None:
        self.weight = layer.weight
        self.bias = layer.bias
        self._layer, self._padding, self.uses = layer, padding, uses
        n = uses[0][0].shape[0]
        if method == "gram" and len(uses) == 1:
            x, g = uses[0]
            a = columns(layer, x)  # [n, in k, T]
            d = g.reshape(n, g.shape[1], -1)  # [n, out, T]
            if a.shape[-1] == 1:
                self.weight_sq = a.square().sum((1, 2)) * d.square().sum((1, 2))
            else:
                gram_a = torch.bmm(a.transpose(1, 2), a)
                self.weight_sq = (gram_a.mul_(torch.bmm(d.transpose(1, 2), d))).sum((1, 2))
        else:  # per-sample gradients of this layer only, summed over its uses, then dropped
            total = None
            for x, g in uses:
                grads = sample_grads(layer, x, g)[self.weight]
                total = grads if total is None else total.add_(grads)
            assert total is not None
            self.weight_sq = torch.linalg.vector_norm(total.reshape(n, -1), dim=1).square_()
            del total
        if self.bias is not None:
            sums = [g.reshape(n, g.shape[1], -1).sum(-1) for _, g in uses]
            self._g_sum = sums[0] if len(sums) == 1 else torch.stack(sums).sum(0)
            self.bias_sq = self._g_sum.square().sum(1)
        else:
            self._g_sum = self.bias_sq = None

    @torch.no_grad()
    def _weight_sum(self, factor: torch.Tensor, out: torch.Tensor) -> None:
        layer = self._layer
        out.zero_()
        for x, g in self.uses:
            scale = factor.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))
            _, grad, _ = torch.ops.aten.convolution_backward(
                g * scale, x, self.weight, None, layer.stride, self._padding, layer.dilation,
                False, [0] * (x.dim() - 2), layer.groups, (False, True, False),
            )
            out.add_(grad)
