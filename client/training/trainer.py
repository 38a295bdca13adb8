"""Patient-level DP-SGD training with Opacus; knows nothing about Flower.

:func:`train_dp` trains a copy of a model for a few epochs with DP-SGD (Abadi et al., "Deep
Learning with Differential Privacy", CCS 2016): Poisson-sampled batches, per-sample gradient
clipping to ``max_grad_norm`` and Gaussian noise of standard deviation
``noise_multiplier * max_grad_norm``. Privacy accounting composes across calls: the caller
passes the accountant history of earlier rounds (``prior``) and gets the extended history back,
because Flower recreates the ClientApp for every message.

The unit of privacy is the record of the dataset handed in, which must be one record per
**patient** (the data layer groups a patient's images); otherwise epsilon protects single
images, not patients.

The loss follows the model contract of :mod:`common.models.registry`: a module with a
``dp_loss(inputs, targets)`` method (autoencoders, RBM-based models, ...) is trained on that
loss, called through the Opacus wrapper so that per-sample gradients are captured; any other
module is trained on cross-entropy of its output (class logits, or per-voxel logits against a
``[B, *spatial]`` mask). The Opacus per-sample gradient mode defaults to the one registered for
the model (:attr:`common.models.ModelSpec.grad_sample_mode`).

Caveat: Opacus's ``secure_mode`` (cryptographically strong noise, needs ``torchcsprng``) is
not enabled; the pseudo-random noise suffices for research use, not for a formal release.
"""

from __future__ import annotations

import copy
import logging
import math
import secrets
import warnings
from collections.abc import Callable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, Dataset

from common.errors import ConfigError, PrivacyConfigError
from common.models.registry import GRAD_SAMPLE_MODES, spec_of
from common.privacy.accountant import AccountantState, epsilon

from .per_sample import make_private_direct

__all__ = [
    "DEFAULT_GRAD_SAMPLE_MODE",
    "GRAD_SAMPLE_MODES",
    "TrainResult",
    "resolve_grad_sample_mode",
    "select_device",
    "train_dp",
]

logger = logging.getLogger(__name__)
# Opacus warns on every engine that its secure_mode is off. That is a documented choice (the
# module docstring, the README's privacy model), not news to whoever reads a node's screen or
# log, where it repeated once per training process (once per run in the in-process engine).
warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)

DEFAULT_GRAD_SAMPLE_MODE = "hooks"
"""Opacus mode for a module that was not built by :func:`common.models.build_model`."""

_NO_EMPTY_BATCH_MODES = frozenset({"ew", "functorch", "direct"})
"""Modes whose per-sample machinery fails on an empty (Poisson) batch; see
:func:`_noise_only_step`."""

DIRECT_PAD_MULTIPLE = 4
"""Under ``grad_sample_mode="direct"`` the Poisson batches of a model without ``dp_loss`` are
run padded to a multiple of this many rows (zero-weight repeats, see :class:`_ModelLoss`), so
that the convolution libraries meet about a dozen batch shapes instead of ~50; 1 turns padding
off."""

DIRECT_PARTS_MIN_SAMPLE_SIZE = 4096
"""By default (``train_dp``'s ``physical_batch_size=None``) a DP step's Poisson batch of samples
larger than this (volumes) runs in parts of half the expected batch size when the model has
convolutions. Measured
(``bench/architectures.py --timing-only --physical-batch-sizes``, 28^3 AdrenalMNIST3D, batch
32, 1 thread, two runs; ``bench/RESULTS.md``): the peak memory of a DP epoch over plain
training's went from 1.44-1.64 to 0.95-1.02 (cnn3d), 1.76-1.95 to 0.98-1.13 (resnet) and
2.49-2.73 to 1.22-1.32 (densenet), its time from 1.11-1.12 to 0.77-0.89, 0.84-0.99 to
0.82-0.88 and 1.47-1.50 to 1.78-1.79. On 28 x 28 images parts of 32 cost 0.2-0.9 in time
for 0.1-0.4 in memory, so those run whole; so do models without convolutions, whose memory
parts hardly change and whose per-pass Python they double (3D lstm 1.23 -> 1.60 in time, 1.60
-> 1.54 in memory; gru 1.24 -> 1.74, 1.44 -> 1.34; mlp 1.91 -> 2.27, 1.12 both)."""

DIRECT_PAD_MAX_SAMPLE_SIZE = 4096
"""Padding is only for samples of at most this many values (e.g. 28x28 or 64x64 images).
Measured on 2 CPU cores: it takes DenseNet's 2D site-epochs from 2.16 to 1.73 times the
non-private time, but makes 28^3 volumes' DP steps ~3 % slower: there a row costs far more
than the kernel builds it saves (``bench/RESULTS.md``)."""

_WRAPPER_FORWARD_MODES = frozenset({"ew", "ghost"})
"""Modes that capture per-sample gradients only through the wrapper's own ``forward`` ("ew":
``call_for_per_sample_grads``) or criterion ("ghost"), so a ``dp_loss`` that calls the inner
module's layers directly is not seen by them. "ghost" works with a model that also has
``dp_loss_per_sample`` (see :class:`_PerSampleLoss`)."""

ProgressFn = Callable[[int, int], None]
"""Called as ``progress(steps_done, steps_total)`` after every optimiser step."""

OutputLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""A task's per-sample loss of ``(outputs, targets)``: a ``[B]`` tensor whose row ``i``
depends on row ``i`` only (:meth:`common.tasks.Task.per_sample_loss`)."""

InputLoss = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""A per-sample loss computed from the model and its inputs, ``(model, inputs, targets) ->
[B]`` (self-supervised reconstruction: :meth:`common.tasks.reconstruction.ReconstructionTask.
model_loss`)."""


@dataclass(frozen=True)
class TrainResult:
    """Outcome of one :func:`train_dp` call.

    Attributes
    ----------
    state_dict : dict of str to torch.Tensor
        Trained weights of the *unwrapped* module (no ``_module.`` prefix), detached, on CPU.
    num_examples : int
        Records (patients) in the training set.
    train_loss : float
        Mean training loss (cross-entropy, or the model's ``dp_loss``) over the images seen
        in this call.
    epsilon : float
        Total RDP epsilon of the run so far (prior events plus this call) at ``delta``;
        ``inf`` for a non-private call (see :func:`train_dp`).
    delta : float
        Delta of ``epsilon``.
    noise_multiplier : float
        Noise multiplier used (0.0 when not private).
    sample_rate : float
        Poisson sample rate used (``1 / ceil(n / batch_size)``); for a non-private call,
        ``batch_size / n`` for information only.
    steps : int
        Optimiser steps taken in this call.
    accountant_state : AccountantState
        Accountant history including this call's event (unchanged when not private).
    """

    state_dict: dict[str, torch.Tensor]
    num_examples: int
    train_loss: float
    epsilon: float
    delta: float
    noise_multiplier: float
    sample_rate: float
    steps: int
    accountant_state: AccountantState


def select_device(preferred: str | None = None) -> torch.device:
    """Return ``preferred`` if given and usable, else CUDA when available, else CPU.

    Raises
    ------
    ConfigError
        If ``preferred`` names CUDA but no CUDA device is available, or is not a device name.
    """
    if preferred:
        try:
            device = torch.device(preferred)
        except RuntimeError as exc:
            raise ConfigError(f"unknown device {preferred!r}; use 'cpu' or 'cuda[:N]'") from exc
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {preferred!r} requested but CUDA is not available")
        return device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _validate(
    *,
    num_records: int,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    grad_sample_mode: str,
) -> None:
    if num_records < 1:
        raise ConfigError("the training dataset is empty; at least one patient is needed")
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if not math.isfinite(learning_rate) or learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {learning_rate}")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise PrivacyConfigError(
            f"noise_multiplier must be >= 0, got {noise_multiplier}; plan it with "
            "common.privacy.plan_noise_multiplier(target_epsilon=...)"
        )
    if not math.isfinite(max_grad_norm) or max_grad_norm <= 0:
        raise PrivacyConfigError(f"max_grad_norm must be > 0 (typically 0.1-10), got {max_grad_norm}")
    if not math.isfinite(delta) or not 0.0 < delta < 1.0:
        raise PrivacyConfigError(
            f"delta must lie in (0, 1), got {delta}; use common.privacy.default_delta(n)"
        )
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, got {grad_sample_mode!r}"
        )


def resolve_grad_sample_mode(model: nn.Module, requested: str | None = None) -> str:
    """Return the Opacus mode to train ``model`` with.

    Parameters
    ----------
    model : torch.nn.Module
        The model; if it was built by :func:`common.models.build_model` its registered
        :attr:`~common.models.ModelSpec.grad_sample_mode` is the default.
    requested : str, optional
        An explicit mode, which wins over the registry.

    Returns
    -------
    str
        ``requested`` if given, else the registered mode, else :data:`DEFAULT_GRAD_SAMPLE_MODE`.
    """
    if requested is not None:
        return requested
    spec = spec_of(model)
    return spec.grad_sample_mode if spec is not None else DEFAULT_GRAD_SAMPLE_MODE


class _PerSampleLoss:
    """Criterion adapter over a model's ``dp_loss_per_sample`` for Opacus ghost clipping.

    Ghost clipping (``grad_sample_mode="ghost"``) needs the per-sample losses: Opacus wraps
    the criterion, sets ``reduction = "none"`` to get them, back-propagates once to get the
    per-sample gradient norms and again with the clipping coefficients. This adapter takes
    ``(inputs, targets)`` and honours ``reduction``.
    """

    def __init__(self, per_sample: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self._per_sample = per_sample
        self.reduction = "mean"

    def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        per_sample: torch.Tensor = self._per_sample(inputs, targets)
        if self.reduction == "none":
            return per_sample
        return per_sample.sum() if self.reduction == "sum" else per_sample.mean()


class _OutputCriterion:
    """Criterion over a task's per-sample loss of the outputs, honouring ``reduction``.

    Opacus's ghost clipping sets ``reduction = "none"`` on the criterion it wraps to get the
    per-sample losses; the other paths use the batch mean (or the "direct" engine's sum).
    """

    def __init__(self, per_sample: OutputLoss) -> None:
        self._per_sample = per_sample
        self.reduction = "mean"

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        losses: torch.Tensor = self._per_sample(outputs, targets)
        if self.reduction == "none":
            return losses
        return losses.sum() if self.reduction == "sum" else losses.mean()


class _ModelLoss:
    """Loss of one batch: the model's ``dp_loss`` when it has one, else cross-entropy.

    ``dp_loss`` is looked up on the unwrapped module but called as a bound method of it while
    its sub-modules are the ones wrapped by Opacus's hooks, so per-sample gradients are
    captured (Opacus's ``GradSampleModule`` keeps the original module as ``_module`` and hooks
    its layers in place).

    ``reduction="sum"`` (the cross-entropy path only) returns ``n`` times the batch's mean
    loss, the sum of the samples' own losses, for the "direct" engine (which then need not
    scale its per-sample gradients); the returned factor still gives the mean sample loss.

    With ``pad_multiple`` (the cross-entropy path with ``reduction="sum"`` only; samples of at
    most :data:`DIRECT_PAD_MAX_SAMPLE_SIZE` values) a batch of ``n`` samples is run as
    ``ceil(n / pad_multiple) * pad_multiple`` rows: the extra rows repeat real samples, and the
    loss is the sum of the ``n`` real losses, so the extra rows get no gradient and the real
    rows' per-sample gradients are those of the unpadded batch (to float rounding: other
    kernel shapes). :attr:`rows` is then the real ``n``: the trainer has the "direct" engine
    keep only those rows of every per-sample gradient (``restore(rows=...)``), so clipping,
    noise and accounting never see the padding. The point is the shapes: Poisson batches
    change size at every step, and oneDNN (CPU) builds new kernels, and cuDNN new plans, for
    every convolution at every new batch size, which on CPU can cost as much as the step
    itself; padded, a DP run meets about a dozen sizes instead of ~50.
    """

    def __init__(
        self, model: nn.Module, criterion: Any, pad_multiple: int = 1, reduction: str = "mean",
        *, own_loss: bool = True,
    ) -> None:
        inner = getattr(model, "_module", model)
        # A task's loss (own_loss=False) replaces the model's own dp_loss.
        self._dp_loss = getattr(inner, "dp_loss", None) if own_loss else None
        self._model = model
        self._criterion = criterion
        # Ghost clipping wraps the criterion; a _PerSampleLoss criterion takes the inputs.
        self._inputs_criterion = isinstance(
            getattr(criterion, "criterion", criterion), _PerSampleLoss
        )
        self._pad_multiple = pad_multiple
        self.rows = 0
        """The real samples of the last batch (the first rows of a padded one)."""
        self._sum = reduction == "sum"
        cross_entropy = (not self._inputs_criterion and not callable(self._dp_loss)
                         and isinstance(criterion, (nn.CrossEntropyLoss, _OutputCriterion))
                         and criterion.reduction == "mean")
        if reduction not in ("mean", "sum") or (self._sum and not cross_entropy):
            raise ValueError("a summed loss needs the cross-entropy criterion path")
        if pad_multiple > 1 and not self._sum:
            raise ValueError("batch padding needs the cross-entropy criterion path, summed")

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``(loss to back-propagate, its factor to the batch's mean sample loss)``."""
        n = self.rows = images.shape[0]
        if self._inputs_criterion:
            ghost: torch.Tensor = self._criterion(images, labels)
            return ghost, 1.0
        if callable(self._dp_loss):
            loss: torch.Tensor = self._dp_loss(images, labels)
            return loss, 1.0
        if not self._sum:
            out: torch.Tensor = self._criterion(self._model(images), labels)
            return out, 1.0
        rows = -(-n // self._pad_multiple) * self._pad_multiple
        if rows == n or images[0].numel() > DIRECT_PAD_MAX_SAMPLE_SIZE:
            logits = self._model(images)
        else:
            padded = images[torch.arange(rows, device=images.device) % n]
            logits = self._model(padded)[:n]  # the extra rows get no gradient
        # n times the batch mean: the sum over samples of each sample's own (mean) loss, for
        # a segmentation mask as for a class label
        summed = self._criterion(logits, labels) * n
        return summed, 1.0 / n if n else math.nan


def _generator(
    seed: int | None, offset: int, device: torch.device | None = None
) -> torch.Generator:
    """A generator seeded from ``seed + offset``, or from OS entropy when ``seed`` is None.

    Without a seed the global torch RNG is NOT used: its state may have been set from a
    seed that the coordinator knows (e.g. by an earlier non-private call in the same process),
    which would make DP noise and Poisson sampling predictable.
    """
    gen = torch.Generator(device=device) if device is not None else torch.Generator()
    gen.manual_seed(secrets.randbits(63) if seed is None else seed + offset)
    return gen


def _cpu_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _batches(
    loader: DataLoader[Any], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for images, labels in loader:
        labels = labels.to(device).long()
        if labels.ndim > 1 and labels[0].numel() == 1:
            labels = labels.reshape(-1)  # [B, 1] class ids -> [B]; masks keep their shape
        yield images.to(device), labels


def train_dp(
    model: nn.Module,
    dataset: Dataset[Any],
    *,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    prior: AccountantState | None = None,
    private: bool = True,
    device: str | torch.device | None = None,
    seed: int | None = None,
    grad_sample_mode: str | None = None,
    progress: ProgressFn | None = None,
    momentum: float = 0.9,
    output_loss: OutputLoss | None = None,
    input_loss: InputLoss | None = None,
    physical_batch_size: int | None = None,
) -> TrainResult:
    """Train a copy of ``model`` with DP-SGD (or plain SGD) and return its weights.

    Parameters
    ----------
    model : torch.nn.Module
        Model to train; it must be Opacus-compatible (no BatchNorm, no in-place ops). The
        caller's module is **not** modified: a deep copy is trained and its weights returned.
    dataset : torch.utils.data.Dataset
        Map-style dataset of ``(image, target)`` pairs, one record per patient; targets are
        integer class ids, or ``[*spatial]`` integer masks for a segmentation model (ignored
        by an unsupervised model's ``dp_loss``).
    epochs : int
        Passes over the data; each pass takes ``ceil(n / batch_size)`` steps.
    batch_size : int
        Expected batch size; the Poisson sample rate is ``1 / ceil(n / batch_size)``.
    learning_rate : float
        SGD learning rate.
    noise_multiplier : float
        Gaussian noise standard deviation per unit of ``max_grad_norm`` (sigma). Zero gives no
        privacy (epsilon is ``inf``); plan it with
        :func:`common.privacy.plan_noise_multiplier`.
    max_grad_norm : float
        Per-sample gradient L2 clipping bound.
    delta : float
        Delta at which epsilon is reported; see :func:`common.privacy.default_delta`.
    prior : AccountantState, optional
        Accountant history of earlier rounds/runs of the same data; restored before training
        so that epsilon composes.
    private : bool, optional
        ``False`` trains with plain SGD on shuffled fixed-size batches: no clipping, no noise,
        no accounting event. The result then carries ``epsilon = inf`` (a non-private release
        has no DP guarantee) and the unchanged ``prior`` history.
    device : str or torch.device, optional
        Where to train; default :func:`select_device`.
    seed : int, optional
        Seeds batch sampling and noise for reproducible runs (not for production releases).
    grad_sample_mode : {"hooks", "functorch", "ew", "ghost", "direct"}, optional
        Per-sample gradient mode: one of Opacus's, or ``"direct"``
        (:mod:`client.training.per_sample`; Opacus still clips, noises and accounts);
        default the mode registered for the model
        (:func:`resolve_grad_sample_mode`), ``"hooks"`` for an unregistered module. ``"ghost"``
        and ``"ew"`` see only the wrapper's forward and criterion, so they cannot train a
        model with ``dp_loss``; ``"ghost"`` can if the model also defines
        ``dp_loss_per_sample`` (per-sample terms ``[B]`` whose mean is ``dp_loss``).
    progress : callable, optional
        ``progress(steps_done, steps_total)`` after each step.
    momentum : float, optional
        SGD momentum.
    output_loss : callable, optional
        The task's per-sample loss of ``(outputs, targets)`` (:data:`OutputLoss`); replaces
        cross-entropy and the model's own ``dp_loss``.
    input_loss : callable, optional
        A per-sample loss of ``(model, inputs, targets)`` (:data:`InputLoss`, e.g.
        reconstruction); replaces cross-entropy and the model's own ``dp_loss``. At most one
        of ``output_loss`` and ``input_loss``; with neither, the model's ``dp_loss`` or
        cross-entropy (the classification default).
    physical_batch_size : int, optional
        Run a DP step's Poisson batch as parts of at most this many samples (one step, the
        same clipping, noise and accounting; Opacus's ``BatchMemoryManager`` rule) to bound
        the memory of its activations: Poisson batches exceed ``batch_size`` by a few
        standard deviations. 0 runs whole batches. Default (None): parts of
        ``ceil(batch_size / 2)`` for a model with convolutions on samples of more than
        :data:`DIRECT_PARTS_MIN_SAMPLE_SIZE` values (volumes), whole batches otherwise (see
        the constant for what was measured). Under ``grad_sample_mode="direct"``
        for a model trained on cross-entropy or an output loss; ignored otherwise and
        without DP.

    Returns
    -------
    TrainResult
        Weights (unwrapped, CPU), loss, epsilon and the extended accountant history.

    Raises
    ------
    ConfigError, PrivacyConfigError
        For invalid arguments.
    """
    grad_sample_mode = resolve_grad_sample_mode(model, grad_sample_mode)
    if physical_batch_size is not None and physical_batch_size < 0:
        raise ConfigError(f"physical_batch_size must be >= 0 (0: whole batches), not {physical_batch_size}")
    if output_loss is not None and input_loss is not None:
        raise ConfigError("give train_dp an output_loss or an input_loss, not both")
    task_loss = output_loss is not None or input_loss is not None
    if not isinstance(dataset, Sized):
        raise ConfigError("dataset must be a map-style dataset with a length")
    num_records = len(dataset)
    _validate(
        num_records=num_records,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate=learning_rate,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        delta=delta,
        grad_sample_mode=grad_sample_mode,
    )
    ghost_per_sample = (
        private and grad_sample_mode == "ghost" and not task_loss
        and callable(getattr(model, "dp_loss_per_sample", None))
    )
    if private and grad_sample_mode == "ew" and input_loss is not None:
        raise ConfigError("grad_sample_mode='ew' cannot train on a loss of the model's inputs; "
                          "use 'hooks', 'functorch', 'ghost' or 'direct'")
    if (
        private and grad_sample_mode in _WRAPPER_FORWARD_MODES and not ghost_per_sample
        and not task_loss and callable(getattr(model, "dp_loss", None))
    ):
        raise ConfigError(
            f"grad_sample_mode={grad_sample_mode!r} cannot train a model with its own dp_loss "
            "(it needs the loss from the wrapped forward/criterion); use 'hooks' or 'functorch'"
            " (or, for 'ghost', give the model a dp_loss_per_sample method)"
        )
    prior = prior or AccountantState()
    dev = device if isinstance(device, torch.device) else select_device(device)
    if seed is not None:
        torch.manual_seed(seed)
    net = copy.deepcopy(model).to(dev)
    net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate, momentum=momentum)
    criterion: Any
    if input_loss is not None:
        def on_inputs(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            return input_loss(net, inputs, targets)

        criterion = _PerSampleLoss(on_inputs)
    elif output_loss is not None:
        criterion = _OutputCriterion(output_loss)
    elif ghost_per_sample:
        criterion = _PerSampleLoss(net.dp_loss_per_sample)
    else:
        criterion = nn.CrossEntropyLoss()
    own_loss = not task_loss
    loader: DataLoader[Any] = DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=_generator(seed, 0)
    )

    if not private:
        loss, steps = _run_epochs(
            _ModelLoss(net, criterion, own_loss=own_loss), optimizer, loader, dev, epochs, progress,
            skip_empty_forward=False,
        )
        logger.warning("non-private training: the released weights carry no DP guarantee")
        return TrainResult(
            state_dict=_cpu_state_dict(net),
            num_examples=num_records,
            train_loss=loss,
            epsilon=math.inf,
            delta=delta,
            noise_multiplier=0.0,
            sample_rate=min(1.0, batch_size / num_records),
            steps=steps,
            accountant_state=prior,
        )

    if noise_multiplier == 0.0:
        logger.warning("noise_multiplier=0: DP-SGD without noise gives no privacy (epsilon=inf)")
    engine = PrivacyEngine(accountant="rdp")
    engine.accountant.history = prior.to_history()
    direct = None
    # the direct engine, for a model without dp_loss, back-propagates the summed loss (its
    # per-sample gradients need no scaling) over padded batches (see _ModelLoss)
    summed_loss = grad_sample_mode == "direct" and input_loss is None and (
        output_loss is not None or not callable(getattr(net, "dp_loss", None)))
    if grad_sample_mode == "direct":  # our per-sample engine, Opacus's optimizer and loader
        direct, dp_optimizer, dp_loader = make_private_direct(
            engine, module=net, optimizer=optimizer, data_loader=loader,
            noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
            noise_generator=_generator(seed, 1, dev),
            loss_reduction="sum" if summed_loss else "mean",
        )
        dp_model: nn.Module = net
    else:
        wrapped = engine.make_private(
            module=net,
            optimizer=optimizer,
            criterion=criterion,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode=grad_sample_mode,
            noise_generator=_generator(seed, 1, dev),
        )
        if grad_sample_mode == "ghost":
            dp_model, dp_optimizer, criterion, dp_loader = wrapped
        else:
            dp_model, dp_optimizer, dp_loader = wrapped
    rate = float(dp_loader.sample_rate)  # type: ignore[attr-defined]  # DPDataLoader
    if summed_loss:
        batch_loss = _ModelLoss(dp_model, criterion, pad_multiple=DIRECT_PAD_MULTIPLE,
                                reduction="sum", own_loss=own_loss)
    else:
        batch_loss = _ModelLoss(dp_model, criterion, own_loss=own_loss)
    after_backward: Callable[[bool], None] | None = None
    parts: _Parts | None = None
    if direct is not None:
        hooks = direct

        def restore_real_rows(more: bool) -> None:  # parameters back to autograd; drop the padding rows
            hooks.restore(rows=batch_loss.rows, more=more)

        after_backward = restore_real_rows
        # by default only a model with convolutions runs volumes in parts (see the constant)
        auto = -(-batch_size // 2) if any(
            isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) for m in net.modules()) else 0
        if summed_loss and (physical_batch_size or (physical_batch_size is None and auto)):
            parts = _Parts(physical_batch_size, auto, hooks.reserve)
    if physical_batch_size and parts is None:
        logger.info("physical batches are for the direct engine's models trained on "
                    "cross-entropy or an output loss: this one runs whole Poisson batches")

    try:
        loss, steps = _run_epochs(
            batch_loss, dp_optimizer, dp_loader, dev, epochs, progress,
            skip_empty_forward=grad_sample_mode in _NO_EMPTY_BATCH_MODES,
            after_backward=after_backward, parts=parts,
        )
    finally:
        if direct is not None:
            direct.close()
            # The last step's per-sample state, as Opacus's _close drops it: a ghost record
            # (on p.grad_sample) refers back to its layer's parameters, a reference cycle
            # that kept its inputs and output gradients (5 MB a call on the LSTM) until the
            # cyclic GC ran: a node's memory grew round after round (40 -> 106 MiB over 30
            # site-epochs, measured)
            for p in net.parameters():
                for attr in ("grad_sample", "summed_grad"):
                    if getattr(p, attr, None) is not None:
                        setattr(p, attr, None)
        close = getattr(dp_model, "_close", None)
        if callable(close):
            close()  # detach Opacus hooks and per-sample gradient buffers
    state = AccountantState.from_history(engine.accountant.history)
    if state.total_steps != prior.total_steps + steps:
        raise RuntimeError(
            f"accountant recorded {state.total_steps - prior.total_steps} steps, trained {steps}"
        )
    eps = epsilon(state, delta=delta)
    logger.info(
        "DP-SGD: %d steps, sigma=%.4g, q=%.4g, C=%.4g -> total epsilon %.4g at delta %.2g",
        steps, noise_multiplier, rate, max_grad_norm, eps, delta,
    )
    return TrainResult(
        state_dict=_cpu_state_dict(net),
        num_examples=num_records,
        train_loss=loss,
        epsilon=eps,
        delta=delta,
        noise_multiplier=float(noise_multiplier),
        sample_rate=rate,
        steps=steps,
        accountant_state=state,
    )


def _run_epochs(
    batch_loss: _ModelLoss,
    optimizer: torch.optim.Optimizer,
    loader: DataLoader[Any],
    device: torch.device,
    epochs: int,
    progress: ProgressFn | None,
    *,
    skip_empty_forward: bool,
    after_backward: Callable[[bool], None] | None = None,
    parts: _Parts | None = None,
) -> tuple[float, int]:
    """Run the SGD loop; return (mean image loss, steps taken).

    With ``skip_empty_forward`` an empty Poisson batch is not run through the model (modes
    that cannot) but still takes its noise-only DP step (:func:`_noise_only_step`).
    ``after_backward(more)`` runs after every backward pass, also when the forward or backward
    raises, before the optimiser step (the "direct" engine gives parameters back to autograd);
    ``more`` is True when another physical batch of the same step follows (``parts``).
    """
    total_steps = epochs * len(loader)
    steps, loss_sum, seen = 0, 0.0, 0
    for _ in range(epochs):
        for images, labels in _batches(loader, device):
            optimizer.zero_grad(set_to_none=True)
            if skip_empty_forward and len(labels) == 0:
                _noise_only_step(optimizer)
                steps += 1
                if progress is not None:
                    progress(steps, total_steps)
                continue
            split = [(images, labels)] if parts is None else parts.split(images, labels)
            for k, (x, y) in enumerate(split):
                try:
                    loss, to_mean = batch_loss(x, y)
                    loss.backward()
                finally:
                    if after_backward is not None:
                        after_backward(k < len(split) - 1)
                if len(y) > 0:
                    loss_sum += float(loss.item()) * to_mean * len(y)
                    seen += len(y)
            optimizer.step()  # an empty Poisson batch still takes a (noise-only) step
            steps += 1
            if progress is not None:
                progress(steps, total_steps)
    return (loss_sum / seen if seen else math.nan), steps


class _Parts:
    """A DP step's Poisson batch as physical batches of at most ``size`` samples (None: of
    ``auto`` samples when a sample has more than :data:`DIRECT_PARTS_MIN_SAMPLE_SIZE` values
    and ``auto`` is not 0, else whole): full ones first, then the rest, so that the large activations always have the
    same shape and the allocator reuses their memory (batches of every size fragment its
    heap). ``reserve(rows)`` is told the step's rows first (the direct engine's buffer holds
    them all)."""

    def __init__(self, size: int | None, auto: int, reserve: Callable[[int], None]) -> None:
        self.size, self._auto, self._reserve = size, auto, reserve

    def split(self, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = len(labels)
        size = self.size
        if size is None:
            if not self._auto or n == 0 or images[0].numel() <= DIRECT_PARTS_MIN_SAMPLE_SIZE:
                return [(images, labels)]
            size = self._auto
        if n <= size:
            return [(images, labels)]
        self._reserve(n + DIRECT_PAD_MULTIPLE)  # the last part may be padded
        return [(images[a:a + size], labels[a:a + size]) for a in range(0, n, size)]


def _noise_only_step(optimizer: torch.optim.Optimizer) -> None:
    """Take the DP step of an empty Poisson batch without a forward pass.

    Opacus's ``DPOptimizer`` treats zero per-sample gradients (shape ``[0, *p.shape]``) as an
    empty batch: the clipped sum is zero, Gaussian noise is added and the accountant records
    the step, exactly as when the hooks see an empty batch. "ew" and "functorch" modes cannot
    run the model on a batch of size 0, so the trainer sets those empty per-sample gradients
    itself.
    """
    params = getattr(optimizer, "params", None)
    if params is None:  # not an Opacus optimizer: nothing to do for an empty batch
        return
    for p in params:
        p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)
    optimizer.step()
