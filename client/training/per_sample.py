"""Per-sample gradients for DP-SGD without Opacus's bookkeeping overhead ("direct" mode).

Opacus computes per-sample gradients in one of its ``grad_sample_mode`` s and then clips,
noises and accounts in its ``DPOptimizer``. For the small convolutional networks of the zoo
on a CPU its per-sample step costs more than the rest of the training step together: in
"hooks" mode it unfolds every convolution's input (``k*k`` copies of the activation) before a
batched matrix product, allocates every per-sample gradient twice (a zero-filled buffer, then
a copy), and autograd still computes the batch weight gradients that DP-SGD throws away.
Opacus has no mode without these costs, so this module is our own per-sample gradient engine
for the common layers. Poisson sampling, clipping, noise and accounting stay Opacus's:
:func:`make_private_direct` composes Opacus's ``DPDataLoader``, ``DPOptimizer`` (as
:class:`DirectDPOptimizer`, which only trims per-parameter Python work) and accountant hook as
``PrivacyEngine.make_private`` does, and this engine writes the ``p.grad_sample`` they read.

What the engine does differently, per layer that owns trainable parameters:

* **Convolutions** (``Conv1d/2d/3d``): the per-sample weight gradients are one *grouped*
  convolution weight gradient, with the batch folded into the channel axis and one group per
  sample (``torch.ops.aten.convolution_backward`` with ``groups = n * groups``), so the
  optimised convolution kernels do the work and nothing is unfolded. For maps with very few
  positions the unfold-and-multiply form (Opacus's, on :func:`opacus.utils.tensor_utils.unfold2d`)
  is faster, and for large maps (3D stems) one plain weight gradient per sample is; the engine
  times the three once per layer shape (per-sample shape: Poisson batches vary in size, and
  the fastest method does not) and remembers the fastest (:data:`_CONV_METHOD`; the three
  are equal to rounding, which the tests check).
* **Linear** and **GroupNorm**: closed forms (an outer product; per-channel sums of
  ``x_hat * grad``). Under :func:`make_private_direct` linear layers (also Opacus's
  ``RNNLinear`` cells of ``DPLSTM``/``DPGRU``, their time steps as a tied layer's uses) are
  instead clipped by **ghost norms** (:mod:`client.training.ghost`): per-sample norms from the
  inputs and output gradients, the clipped sum as one weighted matrix product, no
  ``[n, out, in]`` tensor; the optimiser adds their squared norms to the buffer's. Such a
  layer runs, while the engine trains it, as one autograd function
  (:class:`_GhostLinearFunction`) that keeps its input and output gradient and returns only
  the input's gradient, instead of the hooks below (an LSTM cell runs twice per time step). A
  convolution whose output gradients are smaller than its per-sample gradients (a small map
  and many weights) keeps those instead (:class:`~client.training.ghost.GhostConv`: norms by
  Gram matrices or by its per-sample gradients formed and dropped, the clipped sum as one
  weight gradient of the factor-scaled output gradients), so the buffer holds only the
  layers for which it is the smaller record (on 28 x 28 images ResNet's buffer keeps 8,200
  of its 77,450 weights' columns, the CNN's 4,960 of 14,274).
* **No batch weight gradients**: while a convolution or a (non-ghost) linear layer runs forward, its
  parameters are taken out of autograd
  (``requires_grad = False``), so autograd only propagates to the inputs; :meth:`DirectPerSampleGradients.restore` puts them back and
  the trainer calls it after every backward pass (and on any error). A layer called on the
  data (the first layer, an RNN cell's input projection at every time step) has its
  parameters taken out too, and its output is given a graph by an identity autograd
  function that stops there (:class:`_Tap`), so no batch weight gradient is computed for it
  either; GroupNorm keeps its parameters (its fused backward computes them at almost no cost).
* **One buffer**: each backward pass writes all per-sample gradients into the columns of one
  ``[n, total parameters]`` tensor (the samplers write in place where the operation allows
  it; the first ``n`` rows of a storage kept between passes, since fresh memory of that size
  would be faulted in again at every step), and ``p.grad_sample`` is the parameter's
  ``[n, *p.shape]`` view of it, valid until the next backward pass; :class:`DirectDPOptimizer` then clips with one norm and one
  matrix-vector product over the buffer instead of a few operations per parameter (it falls
  back to the per-parameter form when its parameters are not exactly the buffer's columns).
* A layer used more than once in a forward pass (tied weights) gets the *sum* of its uses'
  per-sample gradients, as in Opacus. Gradients of two backward passes are never summed (that
  would mix two Poisson batches in one step): the engine raises instead, provided
  :meth:`DirectPerSampleGradients.restore` ends each pass (the trainer calls it after every
  backward pass); without it, a second pass would count as the same pass's tied uses.
* A frozen layer's input is no longer saved by autograd, so autograd would not notice an
  in-place change to it after the forward pass; the engine checks its version counter.

The loss is either a mean over the batch (``loss_reduction="mean"``: the output gradients
are scaled by the batch size to give per-sample gradients of the per-sample losses, as Opacus
does) or a sum of per-sample losses (``"sum"``: no scaling; the trainer uses it for the
cross-entropy path, and runs those batches padded to a few sizes, keeping only the real rows
with ``restore(rows=...)``). Either way the optimiser divides by the expected batch size.

Only the layer types in :data:`SUPPORTED_LAYERS` are handled; :func:`unsupported_layers`
names any other module that owns a trainable parameter, and the engine refuses such a model
(use Opacus's "hooks" mode for it).
"""

from __future__ import annotations

import time
import types
import weakref
from collections.abc import Callable, Mapping, Sized
from typing import Any, cast

import torch
from opacus.data_loader import DPDataLoader
from opacus.layers.dp_rnn import RNNLinear
from opacus.layers.param_rename import RenameParamsMixin
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import (
    _check_processed_flag,
    _generate_noise,
    _mark_as_processed,
)
from opacus.privacy_engine import PrivacyEngine
from opacus.utils.tensor_utils import unfold2d, unfold3d
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

from common.errors import ConfigError

from .ghost import GhostConv, GhostLinear, GhostRows, conv_keeps_output_gradients, ghost_record

__all__ = [
    "SUPPORTED_LAYERS",
    "DirectDPOptimizer",
    "DirectPerSampleGradients",
    "conv_grad_sample",
    "conv_grad_sample_grouped",
    "conv_grad_sample_loop",
    "conv_grad_sample_unfold",
    "group_norm_grad_sample",
    "linear_grad_sample",
    "make_private_direct",
    "unfold_columns",
    "unsupported_layers",
]

_CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_LINEAR_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, RNNLinear)
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (*_CONV_TYPES, *_LINEAR_TYPES, nn.GroupNorm)
"""Exact layer types (not subclasses, which may change the forward) the engine handles
(Opacus's ``RNNLinear``, the cells of ``DPLSTM``/``DPGRU``, is ``nn.Linear``'s forward)."""

GradSamples = dict[nn.Parameter, torch.Tensor]

_CONV_METHOD: dict[tuple[Any, ...], str] = {}
"""Fastest per-sample method ("grouped", "unfold" or "loop") per convolution and per-sample input shape,
for this process."""

_AUTOTUNE_REPEATS = 2


def _conv_padding(layer: Any) -> tuple[int, ...] | None:
    """The layer's symmetric zero padding as integers, or None if it has another kind."""
    if getattr(layer, "padding_mode", "zeros") != "zeros":
        return None
    padding = layer.padding
    kernel, dilation = layer.kernel_size, layer.dilation
    if padding == "valid":
        return tuple(0 for _ in kernel)
    if padding == "same":
        total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
        if any(t % 2 for t in total):
            return None  # asymmetric "same" padding
        return tuple(t // 2 for t in total)
    return tuple(int(p) for p in padding)


def unsupported_layers(model: nn.Module) -> list[str]:
    """Names (``name: Type``) of the modules the engine cannot train: modules with trainable
    parameters of another type than :data:`SUPPORTED_LAYERS`, convolutions with other than
    symmetric zero padding, and BatchNorm in training mode (with or without parameters)."""
    out = []
    for name, module in model.named_modules():
        if isinstance(module, RenameParamsMixin) and _only_aliases(model, module):
            continue  # DPLSTM/DPGRU's weight_ih_l0: its cell's parameter under a second name
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            # Opacus's validator lets a BatchNorm without parameters through, but it still
            # normalises each sample with its batch peers' statistics.
            out.append(f"{name}: {type(module).__name__} (mixes samples within a batch)")
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if type(module) not in SUPPORTED_LAYERS:
            out.append(f"{name or '<root>'}: {type(module).__name__}")
        elif isinstance(module, _CONV_TYPES) and _conv_padding(module) is None:
            out.append(f"{name}: {type(module).__name__} with non-zero or asymmetric padding")
    return out


def _supported_params(model: nn.Module) -> set[int]:
    """Ids of the parameters owned by modules of :data:`SUPPORTED_LAYERS`."""
    return {id(p) for m in model.modules() if type(m) in SUPPORTED_LAYERS
            for p in m.parameters(recurse=False)}


def _only_aliases(model: nn.Module, module: nn.Module) -> bool:
    """True if every trainable parameter ``module`` owns is a supported layer's (an alias)."""
    own = [p for p in module.parameters(recurse=False) if p.requires_grad]
    return bool(own) and all(id(p) in _supported_params(model) for p in own)


def _is_pointwise(layer: Any, padding: tuple[int, ...]) -> bool:
    return (all(k == 1 for k in layer.kernel_size) and all(st == 1 for st in layer.stride)
            and not any(padding))


def _write(out: GradSamples | None, p: nn.Parameter, value: torch.Tensor, result: GradSamples) -> None:
    """Record ``value`` as ``p``'s per-sample gradients, copied into ``out[p]`` if given."""
    dest = out.get(p) if out else None
    if dest is None:
        result[p] = value
    else:
        result[p] = dest.copy_(value.view(dest.shape))


def _sum_into(out: GradSamples | None, p: nn.Parameter, t: torch.Tensor, dim: int, result: GradSamples) -> None:
    """Record ``t`` summed over ``dim`` as ``p``'s per-sample gradients, into ``out[p]`` if given."""
    dest = out.get(p) if out else None
    result[p] = t.sum(dim) if dest is None else torch.sum(t, dim, out=dest)


def _channel_sums(g: torch.Tensor, out: GradSamples | None, p: nn.Parameter, result: GradSamples) -> None:
    """Per-sample, per-channel sums of ``g`` (a bias's per-sample gradients)."""
    _sum_into(out, p, g.reshape(g.shape[0], g.shape[1], -1), -1, result)


def conv_grad_sample_grouped(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample gradients of a convolution as one grouped weight gradient (batch as groups).

    ``out`` (optional) maps parameters to ``[n, *p.shape]`` tensors to write the results into.
    """
    n = x.shape[0]
    weight = layer.weight
    # Only the weight gradient is requested, so the weight's values are never read: an
    # uninitialised tensor of the grouped weight's shape is enough.
    placeholder = weight.new_empty((n * weight.shape[0], *weight.shape[1:]))
    _, grad_weight, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, n * g.shape[1], *g.shape[2:]),
        x.reshape(1, n * x.shape[1], *x.shape[2:]),
        placeholder,
        None,
        layer.stride,
        _conv_padding(layer),
        layer.dilation,
        False,
        [0] * (x.dim() - 2),
        n * layer.groups,
        (False, True, False),
    )
    result: GradSamples = {}
    _write(out, weight, grad_weight.view(n, *weight.shape), result)
    if layer.bias is not None:
        _channel_sums(g, out, layer.bias, result)
    return result


def unfold_columns(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """A convolution's input unfolded to ``[n, in * prod(kernel), T]`` (``T`` output
    positions), on Opacus's ``unfold2d``/``unfold3d``."""
    n = x.shape[0]
    padding = _conv_padding(layer)
    if padding is None:
        raise ConfigError(f"{type(layer).__name__} with non-zero or asymmetric padding is not supported")
    if _is_pointwise(layer, padding):
        # a 1x1 convolution (stride 1, no padding): the input is its own unfolding
        return x.reshape(n, x.shape[1], -1)
    if x.dim() == 3:  # Conv1d as a 2D convolution of height 1
        kw: dict[str, Any] = {
            "kernel_size": (1, *layer.kernel_size), "padding": (0, *padding),
            "stride": (1, *layer.stride), "dilation": (1, *layer.dilation),
        }
        return unfold2d(x.unsqueeze(2), **kw)
    kw = {"kernel_size": layer.kernel_size, "padding": padding,
          "stride": layer.stride, "dilation": layer.dilation}
    return unfold2d(x, **kw) if x.dim() == 4 else unfold3d(x, **kw)


def conv_grad_sample_unfold(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample gradients of a convolution by unfolding the input (Opacus's method)."""
    n = x.shape[0]
    weight = layer.weight
    groups = layer.groups
    cols = unfold_columns(layer, x)
    positions = cols.shape[-1]
    d = g.reshape(n, groups, -1, positions)  # [n, groups, out/groups, T]
    a = cols.reshape(n, groups, -1, positions)  # [n, groups, in/groups * k, T]
    result: GradSamples = {}
    dest = out.get(weight) if out else None
    target = None if dest is None else dest.view(n, groups, d.shape[2], a.shape[2])
    if positions == 1:  # an outer product: cheaper as a broadcast multiply than as a matmul
        grad_weight = torch.mul(d, a.transpose(-1, -2), out=target)  # type: ignore[arg-type]
    elif groups == 1:  # bmm writes into a strided destination in place (matmul copies)
        grad_weight = torch.bmm(d[:, 0], a[:, 0].transpose(-1, -2),
                                out=None if target is None else target[:, 0])  # type: ignore[arg-type]
    else:  # [n, groups, out/groups, in/groups*k]
        grad_weight = torch.matmul(d, a.transpose(-1, -2), out=target)  # type: ignore[arg-type]
    result[weight] = grad_weight.view(n, *weight.shape) if dest is None else dest
    if layer.bias is not None:
        _channel_sums(g, out, layer.bias, result)
    return result


def conv_grad_sample_loop(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample gradients of a convolution as ``n`` weight gradients of one sample each.

    The plain (ungrouped) weight-gradient kernel on one sample at a time: on large maps it is
    several times faster than the grouped form, whose kernels handle thousands of groups
    poorly (a 7^3 stride-2 stem on 28^3 volumes, batch 64: 19 ms against 75 ms; the batch
    weight gradient takes 13 ms). On small maps the per-call overhead loses to the others.
    """
    n = x.shape[0]
    weight = layer.weight
    padding = _conv_padding(layer)
    dest = out.get(weight) if out else None
    grad_weight = dest if dest is not None else weight.new_empty((n, *weight.shape))
    for i in range(n):
        _, sample_grad, _ = torch.ops.aten.convolution_backward(
            g[i:i + 1], x[i:i + 1], weight, None, layer.stride, padding, layer.dilation,
            False, [0] * (x.dim() - 2), layer.groups, (False, True, False),
        )
        grad_weight[i].copy_(sample_grad)
    result: GradSamples = {weight: grad_weight}
    if layer.bias is not None:
        _channel_sums(g, out, layer.bias, result)
    return result


SamplerFn = Callable[[Any, torch.Tensor, torch.Tensor, "GradSamples | None"], GradSamples]

_CONV_METHODS: dict[str, SamplerFn] = {
    "grouped": conv_grad_sample_grouped,
    "unfold": conv_grad_sample_unfold,
    "loop": conv_grad_sample_loop,
}


def conv_grad_sample(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample convolution gradients by the fastest method for this shape (timed once).

    The batch size is not part of the key: Poisson batches differ in size at every step, and
    timing the methods again for each would put the autotuning on the training path.
    """
    key = (
        type(layer), x.device.type, x.dtype, tuple(x.shape[1:]), tuple(g.shape[1:]),
        layer.kernel_size, layer.stride, _conv_padding(layer), layer.dilation,
        layer.groups,
    )
    method = _CONV_METHOD.get(key)
    if method is not None:
        return _CONV_METHODS[method](layer, x, g, out)
    timings: dict[str, float] = {}
    result: GradSamples = {}
    for name, fn in _CONV_METHODS.items():
        best = float("inf")
        for _ in range(_AUTOTUNE_REPEATS):
            t0 = time.perf_counter()
            result = fn(layer, x, g, out)
            if x.is_cuda:
                torch.cuda.synchronize(x.device)
            best = min(best, time.perf_counter() - t0)
        timings[name] = best
    _CONV_METHOD[key] = min(timings, key=timings.__getitem__)
    return result


def linear_grad_sample(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample gradients of ``nn.Linear`` for inputs ``[n, in]`` or ``[n, ..., in]``."""
    n = x.shape[0]
    weight = layer.weight
    dest = out.get(weight) if out else None
    result: GradSamples = {}
    if x.dim() == 2:
        result[weight] = torch.mul(g.unsqueeze(2), x.unsqueeze(1), out=dest)  # type: ignore[arg-type]
        if layer.bias is not None:
            _write(out, layer.bias, g, result)
    else:
        d = g.reshape(n, -1, g.shape[-1])
        result[weight] = torch.bmm(d.transpose(1, 2), x.reshape(n, -1, x.shape[-1]), out=dest)  # type: ignore[arg-type]
        if layer.bias is not None:
            _sum_into(out, layer.bias, d, 1, result)
    return result


def group_norm_grad_sample(
    layer: Any, x: torch.Tensor, g: torch.Tensor, out: GradSamples | None = None
) -> GradSamples:
    """Per-sample gradients of ``nn.GroupNorm``'s affine weight and bias.

    ``dL/dw_c = sum over positions of x_hat * g`` and ``dL/db_c = sum of g``, per sample, with
    ``x_hat`` the normalised input (recomputed without the affine transform).
    """
    # x_hat * g in place: one activation-sized temporary, not two (this runs during the
    # backward pass, when the memory peak is)
    x_hat_g = F.group_norm(x, layer.num_groups, eps=layer.eps).mul_(g)
    result: GradSamples = {}
    _channel_sums(x_hat_g, out, layer.weight, result)
    del x_hat_g
    _channel_sums(g, out, layer.bias, result)
    return result


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides: list[int] = []
    step = 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _sampler(module: nn.Module) -> SamplerFn:
    if isinstance(module, _CONV_TYPES):
        return conv_grad_sample
    if isinstance(module, _LINEAR_TYPES):
        return linear_grad_sample
    return group_norm_grad_sample


def _take_input(x: torch.Tensor | None, version: int, module: nn.Module) -> torch.Tensor:
    """The input a forward hook kept for its output's gradient hook, checked unmodified.

    The hook lets go of it once read: the hook lives on the output's autograd node, which the
    loss's graph keeps after the backward pass (the training loop holds the loss until the
    next forward pass), so a kept input would stay alive through the next step's forward
    pass: every hooked layer's input, a whole pass's activations (25 MiB on ResNet at 28 x 28,
    measured), on top of the next pass's.
    """
    if x is None:
        raise RuntimeError(
            f"a second backward pass through the same forward pass of {type(module).__name__}: "
            "per-sample gradients take one backward pass per forward pass"
        )
    if x._version != version:
        raise RuntimeError(
            f"the input of {type(module).__name__} was modified in place after the "
            "forward pass; per-sample gradients would be wrong"
        )
    return x


class _Tap(torch.autograd.Function):
    """Identity on a layer's output that gives it a graph (through ``anchor``, a leaf that
    requires a gradient) and stops back-propagation there: the engine's hook on the result
    receives the output gradient, and nothing upstream (the data) needs one."""

    @staticmethod
    def forward(ctx: Any, output: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:  # noqa: ARG004
        # detach(), not view_as(): a view made inside a custom Function may not be modified
        # in place, and a model may follow its first layer with ReLU(inplace=True)
        return output.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None]:  # noqa: ARG004
        return None, None


class DirectPerSampleGradients:
    """Hooks that write per-sample gradients into ``p.grad_sample`` during ``backward``.

    Parameters
    ----------
    model : torch.nn.Module
        The model to train; every module owning a trainable parameter must be one of
        :data:`SUPPORTED_LAYERS`. Parameters with ``requires_grad=False`` at construction
        are left alone (frozen layers of a pretrained encoder, for instance).
    loss_reduction : {"mean", "sum"}, optional
        How the loss back-propagated reduces its per-sample terms. For "mean" (a batch-mean
        loss) the per-sample gradients are ``n`` times what back-propagation gives, and the
        engine scales them; a "sum" loss gives them as they are, which saves that scaling (one
        operation per layer).
    ghost_linear : bool, optional
        Clip linear layers (``nn.Linear``, Opacus's ``RNNLinear``) by ghost norms
        (:mod:`client.training.ghost`): their ``p.grad_sample`` is then not the per-sample
        gradients but an ``[n]`` tensor of their squared norms that carries the layer's
        :class:`~client.training.ghost.GhostLinear` (read by :class:`DirectDPOptimizer`, which
        forms the clipped sums from it), set by :meth:`restore`. A layer whose parameter is
        also another module's (tied by parameter, not by module) is not ghost-clipped.
    ghost_conv : bool, optional
        Let each convolution choose, at its first forward pass, to keep its output gradients
        until the optimiser step (a :class:`~client.training.ghost.GhostConv`, the same
        ``p.grad_sample`` contract as ``ghost_linear``'s) when they are smaller than its
        per-sample gradients (small maps, many weights: ResNet's and DenseNet's last stages),
        instead of its ``[n, *weight.shape]`` columns of the buffer
        (:func:`~client.training.ghost.conv_keeps_output_gradients`).

    Raises
    ------
    ConfigError
        If a module with trainable parameters is not supported, or ``loss_reduction`` is
        neither; the message names it.

    Notes
    -----
    Call :meth:`restore` after each backward pass (and on errors) before the optimiser step,
    and :meth:`close` when training ends.
    """

    def __init__(self, model: nn.Module, loss_reduction: str = "mean", ghost_linear: bool = False,
                 ghost_conv: bool = False) -> None:
        if loss_reduction not in ("mean", "sum"):
            raise ConfigError(f"loss_reduction must be 'mean' or 'sum', not {loss_reduction!r}")
        self._mean = loss_reduction == "mean"
        bad = unsupported_layers(model)
        if bad:
            raise ConfigError(
                "grad_sample_mode='direct' does not support these layers: " + "; ".join(bad)
                + ". Use grad_sample_mode='hooks' for this model."
            )
        self._handles: list[Any] = []
        self._frozen: dict[int, nn.Parameter] = {}  # taken out of autograd, by id
        self._written: set[int] = set()  # ids of parameters given a grad_sample this pass
        # Every parameter's per-sample gradients are columns of one [n, total] buffer per
        # backward pass (the first n rows of a storage kept between passes, so that its memory
        # is not allocated and faulted in again at every step), written in place by the
        # samplers, so that DirectDPOptimizer clips them with a handful of whole-buffer
        # operations instead of a few per parameter. Columns: parameter order, each once.
        # id -> (first column, [n, *shape] view strides after the row stride)
        # Laid out at the first backward pass (:meth:`_layout`), once the first forward pass
        # has chosen, per convolution, whether it keeps per-sample gradients (columns here)
        # or its output gradients (a GhostConv, see _conv_hook).
        self._columns: dict[int, tuple[int, torch.Size, tuple[int, ...]]] | None = None
        self._params: list[nn.Parameter] = []
        self._width = 0
        self._model_params = [p for p in model.parameters() if p.requires_grad]
        layers = [m for m in model.modules() if type(m) in SUPPORTED_LAYERS
                  and any(p.requires_grad for p in m.parameters(recurse=False))]
        sole = _sole_owners(layers)
        self._ghost_layers = {id(m) for m in layers if isinstance(m, _LINEAR_TYPES) and id(m) in sole} \
            if ghost_linear else set()
        # id(conv) -> its choice (conv_keeps_output_gradients: "gram", "sample" or None for the
        # buffer), made at its first forward pass under autograd; absent: not yet seen
        self._conv_modes: dict[int, str | None] = {}
        self._conv_candidates = {id(m) for m in layers if isinstance(m, _CONV_TYPES) and id(m) in sole} \
            if ghost_conv else set()
        self._layer_params = {id(m): (m, [p for p in m.parameters(recurse=False) if p.requires_grad])
                              for m in layers}
        # id(module) -> (module, trainable, [(x, g) per use]) this pass: a linear layer's
        # [n, T, in] and [n, T, out], a convolution's input and output gradients as they are
        self._ghost_uses: dict[int, tuple[nn.Module, list[nn.Parameter], list[tuple[torch.Tensor, torch.Tensor]]]] = {}
        self._anchor = torch.zeros((), requires_grad=True)  # gives _Tap's outputs a graph
        self._storage: torch.Tensor | None = None
        self._rows: int | None = None  # this pass's batch size, once a layer has written
        # A step run as several physical batches (restore(more=True)): the rows kept by its
        # earlier passes (this pass writes the buffer's rows from there on), and each
        # parameter's per-sample gradients of those passes, joined by the last restore
        self._offset = 0
        self._pending: dict[int, list[torch.Tensor]] = {}
        self._patched: list[nn.Module] = []  # ghost linear layers running _GhostLinearFunction
        for module, trainable in self._layer_params.values():
            if id(module) in self._ghost_layers:
                # no hooks: its forward is one autograd function that keeps (x, g) itself
                _GHOST_KEEP[module] = self._ghost_keep(module, trainable)
                module.forward = types.MethodType(_ghost_linear_forward, module)  # type: ignore[method-assign]
                self._patched.append(module)
                continue
            if not isinstance(module, nn.GroupNorm):  # GroupNorm's fused backward is cheap
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(trainable)))
            if id(module) in self._conv_candidates:
                hook = self._conv_hook(trainable)
            else:
                hook = self._forward_hook(_sampler(module), trainable)
            self._handles.append(module.register_forward_hook(hook))

    def _layout(self) -> None:
        """Give every parameter that keeps per-sample gradients its buffer columns: all but
        the ghost-clipped layers' (a convolution not seen before the first backward pass
        keeps per-sample gradients from then on)."""
        for module_id in self._conv_candidates:
            self._conv_modes.setdefault(module_id, None)
        ghost = {id(p) for module_id, (_, trainable) in self._layer_params.items()
                 if module_id in self._ghost_layers or self._conv_modes.get(module_id)
                 for p in trainable}
        self._columns = {}
        for p in self._model_params:
            if id(p) not in ghost and id(p) not in self._columns:
                self._columns[id(p)] = (self._width, p.shape, _contiguous_strides(p.shape))
                self._params.append(p)
                self._width += p.numel()

    def _conv_hook(self, trainable: list[nn.Parameter]) -> Callable[..., None]:
        """Forward hook of a convolution that may keep its output gradients instead of its
        per-sample gradients: chosen at its first forward pass under autograd, from its
        output's shape (:func:`~client.training.ghost.conv_keeps_output_gradients`)."""
        buffer_hook = self._forward_hook(conv_grad_sample, trainable)
        ghost_hook = self._ghost_hook(trainable)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            key = id(module)
            if key not in self._conv_modes:
                if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
                    return None
                self._conv_modes[key] = (None if self._columns is not None
                                         else conv_keeps_output_gradients(module, output))
            return (ghost_hook if self._conv_modes[key] else buffer_hook)(module, inputs, output)
        return hook

    def _ghost_hook(self, trainable: list[nn.Parameter]) -> Callable[..., None]:
        """Forward hook of a convolution that keeps its output gradients: keep each use's
        input and output gradient (per-sample terms) for :meth:`restore`."""

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            tapped = self._tapped(output, trainable)
            if tapped is None:
                return None
            output = tapped
            x: torch.Tensor | None = inputs[0].detach()
            version = inputs[0]._version

            def backward_hook(grad: torch.Tensor) -> None:
                nonlocal x
                kept = _take_input(x, version, module)
                x = None  # see _take_input
                if any(getattr(p, "grad_sample", None) is not None for p in trainable):
                    raise RuntimeError(
                        "per-sample gradients of an earlier backward pass were not used: "
                        "call optimizer.step() and zero_grad() after every backward pass "
                        "(gradient accumulation is not supported with Poisson sampling)"
                    )
                n = kept.shape[0]
                g = grad * n if self._mean else grad
                use = (kept, g)
                self._ghost_uses.setdefault(id(module), (module, trainable, []))[2].append(use)

            output.register_hook(backward_hook)
            return output
        return hook

    def _finish_ghosts(self, rows: int | None) -> None:
        """Turn this pass's kept uses into ``p.grad_sample`` squared-norm tensors."""
        while self._ghost_uses:  # each layer's uses dropped once stacked: a lower peak
            key, (module, trainable, uses) = self._ghost_uses.popitem()
            record: GhostLinear | GhostConv
            if isinstance(module, _CONV_TYPES):
                if rows is not None:
                    uses = [(x[:rows], g[:rows]) for x, g in uses]
                record = GhostConv(module, uses, cast(tuple[int, ...], _conv_padding(module)),
                                   cast(str, self._conv_modes[key]), unfold_columns, conv_grad_sample)
                self._give_norms(record, trainable)
                continue
            x = uses[0][0] if len(uses) == 1 else torch.cat([u[0] for u in uses], 1)
            g = uses[0][1] if len(uses) == 1 else torch.cat([u[1] for u in uses], 1)
            owned = len(uses) > 1  # stacked: g is a fresh tensor
            del uses
            if rows is not None:
                x, g = x[:rows], g[:rows]
            record = GhostLinear(cast(nn.Linear, module), x, g, owned=owned)
            self._give_norms(record, trainable)

    @staticmethod
    def _give_norms(record: GhostLinear | GhostConv | GhostRows, trainable: list[nn.Parameter]) -> None:
        for p in trainable:
            # its own tensor (Opacus marks it processed), and a plain one: MONAI's MetaTensor
            # (a volume's type) copies a tensor's Python attributes onto everything computed
            # from it, so on a MetaTensor the record would reach the clipping factors and
            # other parameters' norms
            sq = record.squared_norms(p).as_subclass(torch.Tensor).clone()
            sq._ghost_linear = record  # type: ignore[attr-defined]
            p.grad_sample = sq  # type: ignore[attr-defined]

    def _pre_hook(self, trainable: list[nn.Parameter]) -> Callable[..., None]:
        def hook(_module: nn.Module, inputs: tuple[Any, ...]) -> None:
            if not (torch.is_grad_enabled() and inputs):
                return
            for p in trainable:
                if p.requires_grad:
                    p.requires_grad_(False)
                    self._frozen[id(p)] = p
        return hook

    def _tapped(self, output: Any, trainable: list[nn.Parameter]) -> torch.Tensor | None:
        """The output whose gradient a forward hook should catch, or None if none.

        A layer called on data (no input requires a gradient) with its parameters taken out
        of autograd has an output without a graph: it is given one through :class:`_Tap`,
        which hands its gradient to the hook and back-propagates nothing further, so that no
        batch weight gradient is computed for it either.
        """
        if not (torch.is_grad_enabled() and isinstance(output, torch.Tensor)):
            return None
        if output.requires_grad:
            return output
        if not output.is_floating_point() or not any(id(p) in self._frozen for p in trainable):
            return None
        return cast(torch.Tensor, _Tap.apply(output, self._anchor))

    def _forward_hook(
        self,
        sampler: SamplerFn,
        trainable: list[nn.Parameter],
    ) -> Callable[..., None]:
        keep = set(trainable)
        sample_numel = sum(p.numel() for p in trainable)

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
            tapped = self._tapped(output, trainable)
            if tapped is None:
                return None
            output = tapped
            x: torch.Tensor | None = inputs[0].detach()  # shares the version counter with the input
            version = inputs[0]._version

            def backward_hook(grad: torch.Tensor) -> None:
                nonlocal x
                kept = _take_input(x, version, module)
                x = None  # see _take_input
                for p in trainable:
                    if getattr(p, "grad_sample", None) is not None and id(p) not in self._written:
                        # Summing two backward passes would mix two batches' samples in one
                        # row and spend two Poisson draws as one step.
                        raise RuntimeError(
                            "per-sample gradients of an earlier backward pass were not used: "
                            "call optimizer.step() and zero_grad() after every backward pass "
                            "(gradient accumulation is not supported with Poisson sampling)"
                        )
                # Of a batch-mean loss, per-sample gradients are n times the per-sample
                # terms: scale whichever is smaller, the output gradient or them.
                n = kept.shape[0]
                scale_output = not self._mean or grad.numel() <= n * sample_numel
                if self._mean and scale_output:
                    grad = grad * n
                out = self._destinations(trainable, n, grad)
                samples = sampler(module, kept, grad, out)
                for p, gs in samples.items():
                    if p not in keep:
                        continue
                    previous = getattr(p, "grad_sample", None)
                    self._written.add(id(p))
                    self._store(p, gs, 1 if scale_output else n, previous, out.get(p) if out else None)

            output.register_hook(backward_hook)
            return output
        return hook

    def _destinations(self, trainable: list[nn.Parameter], n: int, like: torch.Tensor) -> GradSamples | None:
        """``[n, *p.shape]`` views of this pass's buffer for the parameters not yet written
        in this pass (a tied layer's later uses are added to the first's), or None."""
        fresh = [p for p in trainable if id(p) not in self._written]
        if not fresh:
            return None
        if self._columns is None:
            self._layout()
        storage = self._storage
        if self._rows is None:  # the pass's first layer: (re)allocate if too small
            if storage is None or storage.shape[0] < self._offset + n or storage.dtype != like.dtype \
                    or storage.device != like.device:
                # (a step's earlier physical batches keep their rows of the old storage)
                storage = self._allocate(self._offset + n, like)
            self._rows = n
        elif storage is None or self._rows != n or storage.dtype != like.dtype or storage.device != like.device:
            return None  # an odd layer (another dtype or device): it keeps its own tensors
        views: GradSamples = {}
        row = storage.stride(0)
        origin = storage.storage_offset() + self._offset * row
        columns = cast(dict[int, tuple[int, torch.Size, tuple[int, ...]]], self._columns)
        for p in fresh:  # one as_strided per parameter: [n, *shape] in its columns
            start, shape, strides = columns[id(p)]
            views[p] = storage.as_strided((n, *shape), (row, *strides), origin + start)
        return views

    @staticmethod
    def _store(
        p: nn.Parameter, gs: torch.Tensor, scale: int, previous: torch.Tensor | None,
        dest: torch.Tensor | None,
    ) -> None:
        """Make ``scale * gs`` ``p.grad_sample``: in place in its buffer columns ``dest``
        (where the sampler wrote it, or copied there), added to ``previous`` for a tied
        layer's later use, or as its own tensor when there is no buffer view for it."""
        if previous is not None:  # a tied layer's later use in the same pass
            previous.add_(gs, alpha=scale)
            return
        if dest is None:
            # a copy even unscaled: gs may be autograd's own output gradient (a Linear's
            # bias), which a tied layer's later use would otherwise add to in place
            p.grad_sample = gs * scale if scale != 1 else gs.clone()  # type: ignore[attr-defined]
            return
        if gs is not dest:
            torch.mul(gs, scale, out=dest)
        elif scale != 1:
            dest.mul_(scale)
        p.grad_sample = dest  # type: ignore[attr-defined]

    def _allocate(self, rows: int, like: torch.Tensor) -> torch.Tensor:
        # Poisson batch sizes vary around their mean: leave room for larger ones; a plain
        # tensor even when the data are MetaTensors (see _give_norms)
        storage = self._storage = torch.empty((rows + rows // 4 + 1, self._width),
                                              dtype=like.dtype, device=like.device)
        storage._direct_engine_buffer = True  # type: ignore[attr-defined]  # see _shared_buffer
        return storage

    def reserve(self, rows: int) -> None:
        """Have the buffer hold ``rows`` samples before a step that runs as several physical
        batches (else a later batch of the step reallocates it, and the step's per-sample
        gradients are joined by copying). Before the first backward pass lays the buffer out,
        nothing is known of its width and nothing is done."""
        storage = self._storage
        like = self._model_params[0] if self._model_params else None
        if self._offset == 0 and self._width and like is not None and (
                storage is None or storage.shape[0] < rows or storage.dtype != like.dtype
                or storage.device != like.device):
            self._allocate(rows, like)

    def restore(self, rows: int | None = None, more: bool = False) -> None:
        """Give back to autograd the parameters taken out of it during the forward pass.

        With ``rows``, keep only the first ``rows`` per-sample gradients of this pass (the
        real samples of a padded batch): each ``p.grad_sample`` becomes its first ``rows``
        rows, still a view of the buffer, so the rows beyond are never clipped or summed.

        With ``more``, this pass is one physical batch of a step and others follow (a Poisson
        batch run in parts to bound the memory of its activations): its per-sample gradients
        are kept aside, the next pass writes the samples after them, and the ``restore`` of
        the step's last pass gives each parameter the step's per-sample gradients, every
        sample once, in order: for the buffer's columns one view of its rows, for a ghost
        layer a :class:`~client.training.ghost.GhostRows` over its passes' records.
        """
        for p in self._frozen.values():
            p.requires_grad_(True)
        self._frozen.clear()
        self._finish_ghosts(rows)
        if rows is not None:
            for p in self._params:
                if id(p) in self._written and p.grad_sample.shape[0] > rows:  # type: ignore[attr-defined]
                    p.grad_sample = p.grad_sample[:rows]  # type: ignore[attr-defined]
        self._written.clear()
        self._rows = None  # the next pass overwrites the buffer's rows
        if more or self._pending:
            self._join_passes(more)

    def _join_passes(self, more: bool) -> None:
        """Keep this physical batch's per-sample gradients aside (``more``), or give every
        parameter those of the whole step (the last batch)."""
        taken = [p for p in self._model_params if getattr(p, "grad_sample", None) is not None]
        if self._pending and {id(p) for p in taken} != set(self._pending):
            self._pending.clear()
            self._offset = 0
            raise RuntimeError(
                "the physical batches of one step gave per-sample gradients to different "
                "parameters; run every part of a step through the same layers"
            )
        if more:
            rows = taken[0].grad_sample.shape[0] if taken else 0  # type: ignore[attr-defined]
            for p in taken:
                self._pending.setdefault(id(p), []).append(p.grad_sample)  # type: ignore[attr-defined]
                p.grad_sample = None  # type: ignore[attr-defined]
            self._offset += rows
            return
        pending, self._pending, self._offset = self._pending, {}, 0
        columns = self._columns or {}
        joined: dict[tuple[int, ...], GhostRows] = {}  # one per ghost layer, for its weight and bias
        for p in taken:
            parts = [*pending[id(p)], p.grad_sample]  # type: ignore[attr-defined]
            records = [ghost_record(t) for t in parts]
            if any(r is not None for r in records) and not all(r is not None for r in records):
                raise RuntimeError(f"the physical batches of one step clipped {tuple(p.shape)} "
                                   "parameters in two ways")
            if records[0] is not None:
                key = tuple(id(r) for r in records)
                if key not in joined:
                    joined[key] = GhostRows(cast(list[Any], records))
                self._give_norms(joined[key], [p])
                continue
            storage = self._storage
            total = sum(t.shape[0] for t in parts)
            if id(p) in columns and storage is not None and all(t._base is storage for t in parts) \
                    and parts[0].storage_offset() == storage.storage_offset() + columns[id(p)][0]:
                # the passes wrote consecutive rows of the buffer: one view of them all
                start, shape, strides = columns[id(p)]
                p.grad_sample = storage.as_strided(  # type: ignore[attr-defined]
                    (total, *shape), (storage.stride(0), *strides), storage.storage_offset() + start)
            else:
                p.grad_sample = torch.cat(parts)  # type: ignore[attr-defined]

    def close(self) -> None:
        """Remove the hooks and patched forwards (and restore any parameter still taken out
        of autograd)."""
        self._ghost_uses.clear()
        self._pending.clear()
        self._offset = 0
        self.restore()
        self._storage = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self._patched:
            _GHOST_KEEP.pop(module, None)
            module.__dict__.pop("forward", None)
        self._patched.clear()

    def _ghost_keep(self, module: nn.Module, trainable: list[nn.Parameter]
                    ) -> Callable[[torch.Tensor, torch.Tensor], None]:
        """What a ghost linear layer's backward does with one use's input and output
        gradient: keep them (per-sample terms, ``[n, T, features]``) for :meth:`restore`."""

        def keep(x: torch.Tensor, grad: torch.Tensor) -> None:
            if any(getattr(p, "grad_sample", None) is not None for p in trainable):
                raise RuntimeError(
                    "per-sample gradients of an earlier backward pass were not used: "
                    "call optimizer.step() and zero_grad() after every backward pass "
                    "(gradient accumulation is not supported with Poisson sampling)"
                )
            g = grad * x.shape[0] if self._mean else grad
            use = (_rows_of(x.detach()), _rows_of(g.detach()))  # saved x may require a gradient
            self._ghost_uses.setdefault(id(module), (module, trainable, []))[2].append(use)
        return keep


_GHOST_KEEP: weakref.WeakKeyDictionary[nn.Module, Callable[[torch.Tensor, torch.Tensor], None]] = \
    weakref.WeakKeyDictionary()
"""The engine's keep function of each ghost linear layer it trains (a layer not in it, such as
a deep copy made while training, runs ``F.linear``)."""


class _GhostLinearFunction(torch.autograd.Function):
    """``F.linear`` whose backward hands ``(x, g)`` to the engine and returns the input's
    gradient only: the batch weight gradient, which DP-SGD would discard, is never formed.

    One autograd node per call in place of the hooks of the other layers (a forward pre-hook
    that takes the parameters out of autograd, a forward hook, a tensor hook and, on data, a
    tap): an LSTM cell is called twice per time step, so those were ~60 hook calls a batch.
    Autograd's saved-tensor check refuses an input modified in place after the call.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                keep: Callable[[torch.Tensor, torch.Tensor], None]) -> torch.Tensor:
        ctx.keep = keep
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        x, weight = ctx.saved_tensors
        ctx.keep(x, grad)
        return (grad.matmul(weight) if ctx.needs_input_grad[0] else None), None, None, None


def _ghost_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The forward of a ghost linear layer while the engine trains it."""
    keep = _GHOST_KEEP.get(self)
    if keep is None or not torch.is_grad_enabled():
        return F.linear(x, self.weight, self.bias)
    return cast(torch.Tensor, _GhostLinearFunction.apply(x, self.weight, self.bias, keep))


def _rows_of(t: torch.Tensor) -> torch.Tensor:
    """``[n, T, features]`` view of a linear layer's ``[n, features]`` or ``[n, ..., features]``
    input or output (also for ``n = 0``)."""
    return t.unsqueeze(1) if t.dim() == 2 else t.flatten(1, -2)


def _sole_owners(layers: list[nn.Module]) -> set[int]:
    """Ids of the layers whose parameters no other module owns (a parameter shared by two
    modules, tied by parameter rather than by module, keeps per-sample gradients)."""
    owners: dict[int, set[int]] = {}
    for m in layers:
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(id(m))
    return {id(m) for m in layers if all(len(owners[id(p)]) == 1 for p in m.parameters(recurse=False))}


def _shared_buffer(params: list[nn.Parameter]) -> torch.Tensor | None:
    """The engine's buffer if the parameters' per-sample gradients are exactly its columns.

    True when every ``p.grad_sample`` is a view of one 2-D tensor of the parameters' dtype and
    the parameters' sizes add up to its width: the engine gives each parameter its own
    columns, so then every column belongs to exactly one of these parameters.
    """
    if not params:
        return None
    first = getattr(params[0], "grad_sample", None)
    storage = first._base if isinstance(first, torch.Tensor) else None
    if (storage is None or not getattr(storage, "_direct_engine_buffer", False)
            or storage.dim() != 2 or storage.dtype != params[0].dtype):
        return None
    n = first.shape[0]  # type: ignore[union-attr]
    for p in params:
        gs = getattr(p, "grad_sample", None)
        if (not isinstance(gs, torch.Tensor) or gs._base is not storage or gs.shape[0] != n
                or p.dtype != storage.dtype):
            return None
    if sum(p.numel() for p in params) != storage.shape[1] or len({id(p) for p in params}) != len(params):
        return None
    return storage[:n]


class DirectDPOptimizer(DPOptimizer):
    """Opacus's ``DPOptimizer`` with less per-parameter Python work in clipping and scaling.

    The arithmetic is Opacus's (flat clipping: per-sample L2 norm over all parameters,
    factor ``min(1, C / (norm + 1e-6))``, clipped sum; noise ``N(0, (sigma C)^2)`` from
    ``DPOptimizer.add_noise``; division by the expected batch size), but
    ``DPOptimizer.scale_grad`` evaluates ``accumulated_iterations`` (a pass over all
    parameters) once per parameter, and ``clip_and_accumulate`` rebuilds the per-sample
    views and parses an ``einsum`` per parameter. On models with many small parameter tensors
    that costs milliseconds per step. When the per-sample gradients are the columns of the
    engine's buffer, clipping is one norm and one product over it; the norm is then taken
    over all parameters at once rather than per parameter and stacked, which rounds
    differently (the tests check equality with ``DPOptimizer`` to float rounding).
    """

    _flat_summed: torch.Tensor | None = None
    """This step's clipped sums as one vector (set by clipping, read by :meth:`add_noise`)."""
    _flat_grad: torch.Tensor | None = None
    """This step's noised gradients as one vector (set by :meth:`add_noise`, scaled once)."""
    _flats: tuple[torch.Tensor, torch.Tensor] | None = None
    """The one-pass step's clipped-sum and gradient vectors, kept between steps."""
    _views: tuple[tuple[int, ...], dict[int, tuple[torch.Tensor, torch.Tensor]]] | None = None
    """Each parameter's (clipped sum, gradient) views of :attr:`_flats`, for one layout."""

    def pre_step(self, closure: Callable[[], float] | None = None) -> bool | None:
        """Clip, noise, scale and account in one pass when the per-sample gradients are the
        engine's (buffer columns and ghost records) and nothing accumulates; else Opacus's
        sequence (:meth:`clip_and_accumulate`, :meth:`add_noise`, :meth:`scale_grad`)."""
        done = self._one_pass()
        return done if done is not None else super().pre_step(closure)

    def _one_pass(self) -> bool | None:
        """The step of :meth:`pre_step` as one pass over the parameters, or None if it does
        not apply (skipped or accumulated steps, per-sample gradients of another kind).

        The arithmetic is that of :meth:`clip_and_accumulate`, :meth:`add_noise` and
        :meth:`scale_grad`, with the noise drawn in place into a vector kept between steps
        (the same generator call as Opacus's ``_generate_noise``), and each parameter's
        ``summed_grad`` and ``grad`` views of two such vectors made once per layout: on the
        small dense models the per-parameter Python and the fresh vectors of the three calls
        cost more than their arithmetic.
        """
        params = self.params
        if self._step_skip_queue or self.loss_reduction != "mean" or self.secure_mode or not params:
            return None
        ghosts: list[nn.Parameter] = []
        regular: list[nn.Parameter] = []
        for p in params:
            gs = getattr(p, "grad_sample", None)
            if not isinstance(gs, torch.Tensor) or p.summed_grad is not None:  # type: ignore[attr-defined]
                return None
            (regular if ghost_record(gs) is None else ghosts).append(p)
        buffer = _shared_buffer(regular) if regular else None
        if regular and buffer is None:
            return None
        for p in params:  # Opacus's guard against clipping the same samples twice
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
        width = 0 if buffer is None else buffer.shape[1]
        summed, grad, views = self._step_vectors(params, ghosts, buffer, width)
        self._clip_into(buffer, [], ghosts, summed, {id(p): views[id(p)][0] for p in ghosts})
        std = self.noise_multiplier * self.max_grad_norm
        if std > 0:  # _generate_noise's draw (secure_mode is refused above), in place
            grad.normal_(0, std, generator=self.generator)
        else:
            grad.zero_()
        grad.add_(summed).div_(self.expected_batch_size)  # one pass: accumulated_iterations 1
        for p in params:
            p.summed_grad, p.grad = views[id(p)]  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]
        if self.step_hook:
            self.step_hook(self)
        self._is_last_step_skipped = False
        return True

    def _step_vectors(
        self, params: list[nn.Parameter], ghosts: list[nn.Parameter], buffer: torch.Tensor | None,
        width: int,
    ) -> tuple[torch.Tensor, torch.Tensor, dict[int, tuple[torch.Tensor, torch.Tensor]]]:
        """The kept clipped-sum and gradient vectors and each parameter's views of them: the
        buffer's columns first, in their order, then the ghost parameters'."""
        origin = 0 if buffer is None else buffer.storage_offset()
        starts: list[int] = []
        offset = width
        ghost_ids = {id(p) for p in ghosts}
        for p in params:
            if id(p) in ghost_ids:
                starts.append(offset)
                offset += p.numel()
            else:
                starts.append(p.grad_sample.storage_offset() - origin)  # type: ignore[attr-defined]
        like = params[0]
        flats = self._flats
        if flats is None or flats[0].numel() != offset or flats[0].dtype != like.dtype \
                or flats[0].device != like.device:
            flats = self._flats = (like.new_empty(offset), like.new_empty(offset))
            self._views = None
        key = (offset, *starts)
        if self._views is None or self._views[0] != key:
            summed, grad = flats
            self._views = (key, {
                id(p): (summed[a:a + p.numel()].view(p.shape), grad[a:a + p.numel()].view(p.shape))
                for p, a in zip(params, starts, strict=True)
            })
        return flats[0], flats[1], self._views[1]

    def clip_and_accumulate(self) -> None:
        """Clip each sample's gradient to ``max_grad_norm``; sum into ``p.summed_grad``."""
        params = self.params
        for p in params:  # Opacus's guard against clipping the same samples twice
            _check_processed_flag(p.grad_sample)  # type: ignore[attr-defined]
        if any(ghost_record(p.grad_sample) is not None for p in params):  # type: ignore[attr-defined]
            self._clip_with_ghosts(params)
            return
        buffer = _shared_buffer(params)
        if buffer is not None:
            self._clip_buffer(params, buffer)
            return
        samples = [self._get_flat_grad_sample(p).to(p.dtype) for p in params]
        n = samples[0].shape[0]
        flat = [g.reshape(n, p.numel()) for g, p in zip(samples, params, strict=True)]
        if n == 0:
            factor = samples[0].new_zeros(0)
        else:
            norms = torch.stack([f.norm(2, dim=1) for f in flat], dim=1).norm(2, dim=1)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
        for p, f in zip(params, flat, strict=True):
            grad = (factor @ f).view(p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]

    def _clip_with_ghosts(self, params: list[nn.Parameter]) -> None:
        """The same clipping when some parameters are ghost-clipped layers'
        (:meth:`_clip_into`), into one fresh vector: the buffer's columns, in their order (or
        the other parameters' per-sample gradients), then the ghost parameters'."""
        ghosts = [p for p in params if ghost_record(p.grad_sample) is not None]  # type: ignore[attr-defined]
        regular = [p for p in params if ghost_record(p.grad_sample) is None]  # type: ignore[attr-defined]
        first = ghosts[0].grad_sample  # type: ignore[attr-defined]
        buffer = _shared_buffer(regular)
        summed = first.new_empty(sum(p.numel() for p in params))
        fresh = all(p.summed_grad is None for p in params)  # type: ignore[attr-defined]
        views: dict[int, torch.Tensor] = {}
        flats: list[tuple[torch.Tensor, torch.Tensor]] = []
        offset = 0
        if buffer is not None:
            origin = buffer.storage_offset()
            for p in regular:
                start = p.grad_sample.storage_offset() - origin  # type: ignore[attr-defined]
                views[id(p)] = summed[start:start + p.numel()].view(p.shape)
            offset = buffer.shape[1]
        else:
            for p in regular:
                view = summed[offset:offset + p.numel()]
                flat = self._get_flat_grad_sample(p).to(p.dtype).reshape(first.shape[0], p.numel())
                flats.append((flat, view))
                views[id(p)] = view.view(p.shape)
                offset += p.numel()
        for p in ghosts:
            views[id(p)] = summed[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
        self._clip_into(buffer, flats, ghosts, summed, views)
        for p in params:
            grad = views[id(p)]
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]
        self._flat_summed = summed if fresh else None

    def _clip_into(
        self, buffer: torch.Tensor | None, flats: list[tuple[torch.Tensor, torch.Tensor]],
        ghosts: list[nn.Parameter], summed: torch.Tensor, ghost_out: Mapping[int, torch.Tensor],
    ) -> None:
        """Flat clipping of one pass's per-sample gradients, written where the caller says.

        Each sample's squared norm adds up the rows of the engine's ``buffer``, of ``flats``
        (``(per-sample gradients [n, numel], destination of their clipped sum)``) and the
        ghost records' squared norms; its factor is ``min(1, C / (norm + 1e-6))``. The
        buffer's clipped sum (one product) goes to ``summed[:width]``, each ghost parameter's
        to ``ghost_out[id(p)]``.
        """
        norms = [p.grad_sample for p in ghosts]  # type: ignore[attr-defined]
        if buffer is not None:
            norms.append(torch.linalg.vector_norm(buffer, dim=1).square_())  # no [n, total] temporary
        norms += [f.square().sum(1) for f, _ in flats]
        sq = norms[0] if len(norms) == 1 else torch.stack([t.to(norms[0].dtype) for t in norms]).sum(0)
        factor = (self.max_grad_norm / (sq.sqrt() + 1e-6)).clamp(max=1.0)
        if buffer is not None:
            torch.mv(buffer.t(), factor.to(buffer.dtype), out=summed[:buffer.shape[1]])
        for f, out in flats:
            torch.mv(f.t(), factor.to(f.dtype), out=out)
        for p in ghosts:
            ghost_record(p.grad_sample).clipped_sum(p, factor, ghost_out[id(p)])  # type: ignore[attr-defined,union-attr]

    def _clip_buffer(self, params: list[nn.Parameter], buffer: torch.Tensor) -> None:
        """The same clipping on the engine's ``[n, total]`` buffer: one norm, one product."""
        summed = buffer.new_empty(buffer.shape[1])
        self._clip_into(buffer, [], [], summed, {})
        origin = buffer.storage_offset()
        fresh = all(p.summed_grad is None for p in params)  # type: ignore[attr-defined]
        for p in params:
            start = p.grad_sample.storage_offset() - origin  # type: ignore[attr-defined]
            grad = summed[start:start + p.numel()].view(p.shape)
            p.summed_grad = grad if p.summed_grad is None else p.summed_grad + grad  # type: ignore[attr-defined]
            _mark_as_processed(p.grad_sample)  # type: ignore[attr-defined]
        # every p.summed_grad is a view of `summed`: add_noise can noise it in one draw
        self._flat_summed = summed if fresh else None

    def add_noise(self) -> None:
        """Opacus's noise, ``N(0, (noise_multiplier * max_grad_norm)^2)`` on every coordinate of
        every parameter's clipped sum, drawn with Opacus's ``_generate_noise`` (same generator,
        same secure-mode rule) in one draw over all parameters when the sums are one vector.

        The draw covers the same coordinates, each once, as Opacus's per-parameter draws, but
        consumes the generator in another order, so with the same seed the noise values are
        not Opacus's (their distribution is; the tests check both).
        """
        params = self.params
        flat, self._flat_summed = self._flat_summed, None
        self._flat_grad = None
        if flat is None or any(
            p.summed_grad is None or p.summed_grad._base is not flat for p in params  # type: ignore[attr-defined]
        ) or sum(p.numel() for p in params) != flat.numel():
            super().add_noise()
            return
        for p in params:
            _check_processed_flag(p.summed_grad)  # type: ignore[attr-defined]
        noise = _generate_noise(
            std=self.noise_multiplier * self.max_grad_norm, reference=flat,
            generator=self.generator, secure_mode=self.secure_mode,
        )
        grad = noise.add_(flat)  # noise + clipped sum, without a third vector
        origin = flat.storage_offset()
        for p in params:
            start = p.summed_grad.storage_offset() - origin  # type: ignore[attr-defined]
            p.grad = grad[start:start + p.numel()].view_as(p)
            _mark_as_processed(p.summed_grad)  # type: ignore[attr-defined]
        self._flat_grad = grad

    def scale_grad(self) -> None:
        """Divide every ``p.grad`` by the expected batch size (``loss_reduction="mean"``)."""
        flat, self._flat_grad = self._flat_grad, None
        if self.loss_reduction == "mean":
            scale = self.expected_batch_size * self.accumulated_iterations
            params = self.params
            if flat is not None and all(p.grad is not None and p.grad._base is flat for p in params):
                flat /= scale  # every p.grad is a view of it (add_noise)
                return
            for p in params:
                p.grad /= scale


def make_private_direct(
    engine: PrivacyEngine,
    *,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None,
    loss_reduction: str = "mean",
    ghost_linear: bool = True,
    ghost_conv: bool = True,
) -> tuple[DirectPerSampleGradients, DirectDPOptimizer, DPDataLoader]:
    """Opacus's ``make_private`` (Poisson sampling, flat clipping, averaged gradients) for
    "direct" mode.

    The same composition as ``PrivacyEngine.make_private(poisson_sampling=True)``: a
    ``DPDataLoader`` from ``data_loader`` (its generator draws the Poisson batches), sample
    rate ``1 / len(loader)``, expected batch size ``int(len(dataset) * rate)``, and the
    accountant's optimiser hook; the module is not wrapped, the engine's hooks are attached to
    it instead. Like ``make_private`` it first runs Opacus's ``ModuleValidator`` (strict), so
    a layer that mixes samples (BatchNorm, even without parameters) is refused.
    ``loss_reduction`` is the reduction of the loss the caller back-propagates (see
    :class:`DirectPerSampleGradients`); the optimiser averages over the expected batch size
    either way, as Opacus's does for a mean loss. ``ghost_linear`` (default on) clips the
    linear layers by ghost norms, and ``ghost_conv`` (default on) lets each convolution keep
    the smaller of its output gradients and its per-sample gradients (see
    :class:`DirectPerSampleGradients`).

    Raises
    ------
    ConfigError
        For layers the engine does not support.
    opacus.validators.errors.UnsupportedModuleError
        For modules Opacus rejects.
    """
    if engine.secure_mode:
        raise ConfigError("grad_sample_mode='direct' does not support Opacus's secure_mode yet")
    module_params = {id(p) for p in module.parameters()}
    if any(id(p) not in module_params for group in optimizer.param_groups for p in group["params"]):
        raise ConfigError("the optimizer's parameters are not the module's parameters")
    ModuleValidator.validate(module, strict=True)
    per_sample = DirectPerSampleGradients(module, loss_reduction=loss_reduction, ghost_linear=ghost_linear,
                                          ghost_conv=ghost_conv)
    dp_loader = DPDataLoader.from_data_loader(data_loader)
    sample_rate = 1 / len(dp_loader)
    expected_batch_size = int(len(cast(Sized, data_loader.dataset)) * sample_rate)
    dp_optimizer = DirectDPOptimizer(
        optimizer,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected_batch_size,
        loss_reduction="mean",
        generator=noise_generator,
        secure_mode=engine.secure_mode,
    )
    dp_optimizer.attach_step_hook(engine.accountant.get_optimizer_hook_fn(sample_rate=sample_rate))
    return per_sample, dp_optimizer, dp_loader
