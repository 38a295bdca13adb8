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

import torch
from torch import nn

__all__ = ["GhostLinear", "ghost_record"]


class GhostLinear:
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
        if steps == 1:
            self.weight_sq = g.square().sum((1, 2)) * x.square().sum((1, 2))
        elif steps * (width_in + width_out) <= 2 * width_in * width_out:
            # up to twice the flops of the product below, for far less memory (T^2 vs in*out)
            self.weight_sq = (torch.bmm(g, g.transpose(1, 2)) * torch.bmm(x, x.transpose(1, 2))).sum((1, 2))
        else:
            self.weight_sq = torch.bmm(g.transpose(1, 2), x).square().sum((1, 2))
        self._g_sum = g.sum(1) if self.bias is not None else None
        self.bias_sq = None if self._g_sum is None else self._g_sum.square().sum(1)

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
            # in place when g is ours: the record is clipped once (Opacus's processed flag) and
            # its norms and bias sums were taken at construction, so g is not read again
            scale = factor.to(self.g.dtype).view(-1, 1, 1)
            weighted = self.g.mul_(scale) if self._owned else self.g * scale
            torch.mm(weighted.reshape(-1, self.g.shape[-1]).t(), self.x.reshape(-1, self.x.shape[-1]), out=out)
        elif p is self.bias and self._g_sum is not None:
            torch.mv(self._g_sum.t(), factor.to(self._g_sum.dtype), out=out)
        else:
            raise KeyError("not a parameter of this layer")


def ghost_record(t: torch.Tensor | None) -> GhostLinear | None:
    """The :class:`GhostLinear` behind ``p.grad_sample`` ``t``, or None for a real one."""
    return getattr(t, "_ghost_linear", None)
