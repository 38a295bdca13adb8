"""Deep belief network (DBN) and deep Boltzmann machine (DBM), trainable with DP-SGD.

Both models see an image as a vector of Bernoulli visible units: the image is flattened and
clipped to [0, 1] (the node pipeline's percentile scaling already maps images there), and each
intensity is used as the *probability* of its visible unit (Bernoulli-Bernoulli units with
real-valued data probabilities, Hinton, "A Practical Guide to Training Restricted Boltzmann
Machines", 2010, sections 3.2 and 13.1). A Gaussian-Bernoulli first layer was not chosen: it
needs a learnt or fixed per-pixel variance and is notoriously unstable at the learning rates
DP-SGD needs.

DP-SGD compatibility (Opacus, hooks mode). Every parameter is held by an ``nn.Linear``; the
visible bias is a bias-free ``Linear(n_visible, 1)``. Every term of a loss that carries a
gradient goes through a module call (so Opacus hooks see it); sampling and mean-field
iterations run under :func:`torch.no_grad`, where Opacus captures nothing. The training loss
is a *surrogate* whose gradient is the usual estimate of the log-likelihood gradient:

* RBM / DBN layer, contrastive divergence CD-k (Hinton, Neural Computation 14, 2002):
  ``F(v_data) - F(v_model)`` with the free energy ``F`` and ``v_model`` the end of a k-step
  Gibbs chain started at the data (detached). Its gradient for the weights is
  ``-(p(h|v) v^T)_data + (p(h|v) v^T)_model``, minus the CD update.
* DBM (Salakhutdinov and Hinton, "Deep Boltzmann Machines", AISTATS 2009):
  ``E(v, mu1, mu2) - E(v_model, h1_model, h2_model)`` where ``mu`` is the mean-field
  posterior of the data (data-dependent term) and the model sample comes from a short Gibbs
  chain started at the data's mean-field state. Chains are per sample and not persistent,
  so each sample's term depends only on that sample (persistent chains would couple
  records across steps and break per-sample clipping).

Reconstruction task (self-supervised pretraining, :mod:`common.tasks.reconstruction`). Both
models expose ``reconstruction_loss_per_sample(inputs) -> [B]``, the per-sample terms of the
surrogates above (row ``i`` depends only on sample ``i``; in phase ``"pretrain"`` its mean
is ``dp_loss``), and ``reconstruction_modules()``, the sub-modules that objective trains (the task
freezes every other parameter before DP training, since Opacus needs a per-sample gradient for
each trainable parameter):

* DBN: by default the *joint layer-wise* objective ``sum_l [F_l(v_l) - F_l(v_l_model)]``: every
  RBM ``l`` takes its CD-k term on the deterministic up-pass ``v_l = p(h_{l-1} | v_{l-1})`` of
  the data, computed without gradient, so RBM ``l``'s gradient is exactly its CD-k update
  (Hinton 2002) on the current representation of the layers below, and one federated run
  pretrains every layer (the simultaneous variant of greedy layer-wise training: Hinton,
  Osindero and Teh, Neural Computation 18, 2006; Bengio et al., NIPS 2007). The head is not
  trained. In phase ``("pretrain", layer=i)`` (``--model-phase pretrain:<i>``) the objective is
  RBM ``i``'s term only: classic greedy training, one run per layer.
* DBM: the per-sample mean-field / CD surrogate of its ``"pretrain"`` phase
  (``E(v, mu1, mu2) - E(v_model, h1_model, h2_model)``, Salakhutdinov and Hinton 2009), training
  both layers and the visible bias jointly; the head is not trained.

Neither value is a reconstruction error: it is a surrogate whose *gradient* is the
contrastive-divergence estimate, and its value need not fall during training (it is a
difference of energies of the data and of samples that follow the model);
:meth:`DBN.reconstruction_error` and :meth:`DBM.reconstruction_error` are the quantities to
monitor.

Phases (``set_phase``). ``dp_loss(x, y)`` implements the phase the module is in:

* ``set_phase("pretrain", layer=i)`` (DBN): CD-k of RBM ``i`` on the up-pass of the layers
  below it (frozen); only RBM ``i`` trains.
* ``set_phase("pretrain")`` (DBM): joint mean-field training of both layers.
* ``set_phase("finetune")`` (default): cross-entropy of the classifier head on the top hidden
  layer, back-propagated through the (deterministic) up-pass.

``set_phase`` sets ``requires_grad`` so that exactly the parameters the phase uses train
(Opacus refuses a trainable parameter that received no per-sample gradient). Set the phase
**before** wrapping the model with Opacus (``client.training.train_dp`` deep-copies the model
it is given, so set it on that model). The classification ``forward`` returns logits in every
phase.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["DBM", "DBN", "RBM", "Phase", "build_dbm", "build_dbn"]

Phase = Literal["pretrain", "finetune"]
PHASES: tuple[str, ...] = ("pretrain", "finetune")

DEFAULT_HIDDEN: tuple[int, int] = (128, 64)
"""Hidden units of the two layers of the registered DBN and DBM."""


def _visible(x: torch.Tensor) -> torch.Tensor:
    """Flatten ``[B, C, *spatial]`` to visible probabilities ``[B, n_visible]`` in [0, 1]."""
    return torch.clamp(torch.flatten(x, 1), 0.0, 1.0)


class RBM(nn.Module):
    """Bernoulli-Bernoulli restricted Boltzmann machine.

    Energy ``E(v, h) = -b^T v - c^T h - h^T W v``; ``W`` and ``c`` are the weight and bias of
    :attr:`hidden` (``Linear(n_visible, n_hidden)``), ``b`` the weight of
    :attr:`visible_bias` (bias-free ``Linear(n_visible, 1)``).

    Parameters
    ----------
    n_visible, n_hidden : int
        Layer sizes.
    """

    def __init__(self, n_visible: int, n_hidden: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(n_visible, n_hidden)
        self.visible_bias = nn.Linear(n_visible, 1, bias=False)
        with torch.no_grad():  # small weights, zero biases (Hinton's practical guide, 8)
            nn.init.normal_(self.hidden.weight, std=0.01)
            nn.init.zeros_(self.hidden.bias)
            nn.init.zeros_(self.visible_bias.weight)

    def hidden_prob(self, v: torch.Tensor) -> torch.Tensor:
        """``p(h = 1 | v) = sigmoid(W v + c)``."""
        return torch.sigmoid(self.hidden(v))

    def visible_prob(self, h: torch.Tensor) -> torch.Tensor:
        """``p(v = 1 | h) = sigmoid(W^T h + b)``; uses the weights directly: no-grad use only."""
        return torch.sigmoid(
            F.linear(h, self.hidden.weight.t(), self.visible_bias.weight.reshape(-1))
        )

    def free_energy(self, v: torch.Tensor) -> torch.Tensor:
        """Per-sample free energy ``F(v) = -b^T v - sum_j softplus(c_j + W_j v)``, ``[B]``."""
        return -self.visible_bias(v).squeeze(-1) - F.softplus(self.hidden(v)).sum(dim=-1)

    def gibbs(self, v: torch.Tensor, steps: int) -> torch.Tensor:
        """Run ``steps`` alternating Gibbs steps from ``v`` (no grad); return visible probs."""
        with torch.no_grad():
            for _ in range(steps):
                h = torch.bernoulli(self.hidden_prob(v))
                v = self.visible_prob(h)
        return v.detach()

    def cd_per_sample(self, v: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """Per-sample CD-k surrogate ``F(v_i) - F(v_model_i)``, ``[B]`` (Hinton 2002).

        ``v_model`` ends a ``steps``-step Gibbs chain started at ``v`` (per sample, detached),
        so row ``i`` depends only on ``v_i``; the gradient of the row is sample ``i``'s CD-k
        update, negated.
        """
        v_model = self.gibbs(v, steps)
        return self.free_energy(v) - self.free_energy(v_model)

    def cd_loss(self, v: torch.Tensor, steps: int = 1) -> torch.Tensor:
        """CD-k surrogate: batch mean of :meth:`cd_per_sample`; see the module docstring."""
        return self.cd_per_sample(v, steps).mean()

    def reconstruction_error(self, v: torch.Tensor) -> torch.Tensor:
        """Mean squared error of the mean-field reconstruction ``p(v | p(h | v))``, ``[B]``."""
        with torch.no_grad():
            return ((self.visible_prob(self.hidden_prob(v)) - v) ** 2).mean(dim=1)


def _check_phase(phase: str) -> None:
    if phase not in PHASES:
        raise ConfigError(f"phase must be one of {PHASES}, got {phase!r}")


def _train_only(model: nn.Module, trainable: list[nn.Module]) -> None:
    """Set ``requires_grad`` so that exactly the parameters of ``trainable`` train."""
    keep = {id(p) for m in trainable for p in m.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


class DBN(nn.Module):
    """Deep belief network: stacked RBMs plus a linear classifier on the top hidden layer.

    Parameters
    ----------
    n_visible : int
        Visible units (flattened image size).
    num_classes : int
        Output logits.
    hidden : tuple of int, optional
        Hidden units per RBM, bottom to top.
    cd_steps : int, optional
        Gibbs steps ``k`` of CD-k.
    """

    def __init__(
        self,
        n_visible: int,
        num_classes: int,
        *,
        hidden: tuple[int, ...] = DEFAULT_HIDDEN,
        cd_steps: int = 1,
    ) -> None:
        super().__init__()
        if not hidden or cd_steps < 1:
            raise ConfigError("a DBN needs at least one hidden layer and cd_steps >= 1")
        sizes = (n_visible, *hidden)
        self.rbms = nn.ModuleList(RBM(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(hidden[-1], num_classes)
        self.cd_steps = cd_steps
        self.phase: Phase = "finetune"
        self.layer: int | None = None
        self.set_phase("finetune")

    def set_phase(self, phase: Phase, *, layer: int | None = None) -> None:
        """Select what :meth:`dp_loss` trains (see the module docstring).

        Parameters
        ----------
        phase : {"pretrain", "finetune"}
            Greedy layer-wise CD-k pretraining, or supervised fine-tuning.
        layer : int, optional
            The RBM to pretrain (0 = bottom); required for ``"pretrain"`` only.
        """
        _check_phase(phase)
        if phase == "pretrain":
            if layer is None or not 0 <= layer < len(self.rbms):
                raise ConfigError(
                    f"pretraining needs layer in 0..{len(self.rbms) - 1}, got {layer}"
                )
            _train_only(self, [self.rbms[layer]])
        else:
            if layer is not None:
                raise ConfigError("fine-tuning trains every layer; do not pass layer")
            _train_only(self, [*(self.rbm(i).hidden for i in range(len(self.rbms))), self.head])
        self.phase, self.layer = phase, layer

    def rbm(self, layer: int) -> RBM:
        """The RBM of ``layer`` (0 = bottom), typed."""
        rbm = self.rbms[layer]
        assert isinstance(rbm, RBM)
        return rbm

    def up(self, v: torch.Tensor, layers: int | None = None) -> torch.Tensor:
        """Deterministic up-pass ``p(h|v)`` through the first ``layers`` RBMs (all by default)."""
        for layer in range(len(self.rbms) if layers is None else layers):
            v = self.rbm(layer).hidden_prob(v)
        return v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` to logits ``[B, num_classes]`` (every phase)."""
        out: torch.Tensor = self.head(self.up(_visible(x)))
        return out

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Top hidden-layer probabilities ``[B, hidden[-1]]`` (pretrained features)."""
        return self.up(_visible(inputs))

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of the current phase: CD-k of one RBM, or cross-entropy (batch mean)."""
        if self.phase == "pretrain" and self.layer is not None:
            return self.reconstruction_loss_per_sample(inputs).mean()  # RBM `layer`'s CD-k
        return F.cross_entropy(self(inputs), targets.long().reshape(-1))

    def reconstruction_modules(self) -> list[nn.Module]:
        """The RBMs :meth:`reconstruction_loss_per_sample` trains: RBM ``i`` in phase
        ``("pretrain", layer=i)``, otherwise every RBM (never the head)."""
        if self.phase == "pretrain" and self.layer is not None:
            return [self.rbm(self.layer)]
        return list(self.rbms)

    def reconstruction_loss_per_sample(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample self-supervised pretraining objective, ``[B]`` (see the module docstring).

        The sum over the RBMs of :meth:`reconstruction_modules` of their CD-k surrogates
        (:meth:`RBM.cd_per_sample`), each on the deterministic up-pass of the data through the
        layers below it, computed without gradient (lower layers get no gradient from an
        upper layer's term). Targets are not used.

        Parameters
        ----------
        inputs : torch.Tensor
            ``[B, C, *spatial]`` images with intensities in [0, 1].

        Returns
        -------
        torch.Tensor
            ``[B]``: row ``i`` depends only on sample ``i`` (per-sample, non-persistent chains).
        """
        trained = {id(m) for m in self.reconstruction_modules()}
        layers = [i for i in range(len(self.rbms)) if id(self.rbms[i]) in trained]
        v = _visible(inputs)
        total = torch.zeros(v.shape[0], dtype=v.dtype, device=v.device)
        for layer in range(layers[-1] + 1):
            rbm = self.rbm(layer)
            if layer in layers:
                total = total + rbm.cd_per_sample(v, self.cd_steps)
            with torch.no_grad():  # the next layer's data: no gradient to this one
                v = rbm.hidden_prob(v)
        return total

    def reconstruction_error(self, inputs: torch.Tensor, layer: int = 0) -> torch.Tensor:
        """Per-sample reconstruction error of RBM ``layer`` on its input, ``[B]``."""
        with torch.no_grad():
            v = self.up(_visible(inputs), layer)
        return self.rbm(layer).reconstruction_error(v)


class DBM(nn.Module):
    """Two-hidden-layer deep Boltzmann machine with a linear classifier on ``h2``.

    Energy ``E(v, h1, h2) = -b^T v - c1^T h1 - c2^T h2 - h1^T W1 v - h2^T W2 h1``, with
    ``W1, c1`` in :attr:`layer1` (``Linear(n_visible, h1)``), ``W2, c2`` in :attr:`layer2`
    (``Linear(h1, h2)``) and ``b`` in :attr:`visible_bias`.

    Parameters
    ----------
    n_visible : int
        Visible units.
    num_classes : int
        Output logits.
    hidden : tuple of two int, optional
        Units of ``h1`` and ``h2``.
    mean_field_steps : int, optional
        Mean-field fixed-point iterations for the data-dependent term and for inference.
    gibbs_steps : int, optional
        Gibbs steps of the (short, per-sample) model chain.
    """

    def __init__(
        self,
        n_visible: int,
        num_classes: int,
        *,
        hidden: tuple[int, int] = DEFAULT_HIDDEN,
        mean_field_steps: int = 5,
        gibbs_steps: int = 1,
    ) -> None:
        super().__init__()
        if len(hidden) != 2 or mean_field_steps < 1 or gibbs_steps < 1:
            raise ConfigError("a DBM needs two hidden sizes, mean_field_steps and gibbs_steps >= 1")
        self.layer1 = nn.Linear(n_visible, hidden[0])
        self.layer2 = nn.Linear(hidden[0], hidden[1])
        self.visible_bias = nn.Linear(n_visible, 1, bias=False)
        self.head = nn.Linear(hidden[1], num_classes)
        with torch.no_grad():
            for lin in (self.layer1, self.layer2):
                nn.init.normal_(lin.weight, std=0.01)
                nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.visible_bias.weight)
        self.mean_field_steps = mean_field_steps
        self.gibbs_steps = gibbs_steps
        self.phase: Phase = "finetune"
        self.set_phase("finetune")

    def set_phase(self, phase: Phase, *, layer: int | None = None) -> None:
        """Select what :meth:`dp_loss` trains: ``"pretrain"`` (joint) or ``"finetune"``.

        ``layer`` exists for API symmetry with :class:`DBN` and must be ``None``: DBM
        training is joint over both layers.
        """
        _check_phase(phase)
        if layer is not None:
            raise ConfigError("a DBM trains both layers jointly; do not pass layer")
        if phase == "pretrain":
            _train_only(self, [self.layer1, self.layer2, self.visible_bias])
        else:
            _train_only(self, [self.layer1, self.layer2, self.head])
        self.phase = phase

    def _top_down(self, h2: torch.Tensor) -> torch.Tensor:
        """``W2^T h2`` (weights used directly: only under no_grad)."""
        return h2 @ self.layer2.weight

    def mean_field(self, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean-field posterior ``(mu1, mu2)`` of ``v`` (no grad).

        Initialised by a bottom-up pass, then ``mu1 = sigmoid(W1 v + c1 + W2^T mu2)`` and
        ``mu2 = sigmoid(W2 mu1 + c2)`` are iterated ``mean_field_steps`` times.
        """
        with torch.no_grad():
            bottom_up = self.layer1(v)
            mu1 = torch.sigmoid(bottom_up)
            mu2 = torch.sigmoid(self.layer2(mu1))
            for _ in range(self.mean_field_steps):
                mu1 = torch.sigmoid(bottom_up + self._top_down(mu2))
                mu2 = torch.sigmoid(self.layer2(mu1))
        return mu1, mu2

    def gibbs(
        self, v: torch.Tensor, h2: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Short block-Gibbs chain from ``(v, h2)``; return ``(v, h1, h2)`` (no grad)."""
        with torch.no_grad():
            h1 = torch.zeros(v.shape[0], self.layer1.out_features, dtype=v.dtype, device=v.device)
            for _ in range(self.gibbs_steps):
                h1 = torch.bernoulli(torch.sigmoid(self.layer1(v) + self._top_down(h2)))
                v = torch.sigmoid(
                    F.linear(h1, self.layer1.weight.t(), self.visible_bias.weight.reshape(-1))
                )
                h2 = torch.bernoulli(torch.sigmoid(self.layer2(h1)))
        return v.detach(), h1.detach(), h2.detach()

    def negative_energy(
        self, v: torch.Tensor, h1: torch.Tensor, h2: torch.Tensor
    ) -> torch.Tensor:
        """Per-sample ``-E(v, h1, h2)``, ``[B]``, through module calls only (Opacus-visible)."""
        return (
            (self.layer1(v) * h1).sum(dim=-1)
            + (self.layer2(h1) * h2).sum(dim=-1)
            + self.visible_bias(v).squeeze(-1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` from the mean-field posterior of ``h2``.

        After mean-field inference (no grad), one last bottom-up pass with gradient,
        ``h1 = sigmoid(W1 v + c1 + W2^T mu2)``, ``h2 = sigmoid(W2 h1 + c2)``, feeds the head;
        the top-down message ``W2^T mu2`` is a constant there (stop-gradient), a simplification
        of Salakhutdinov and Hinton's fine-tuning network that keeps every gradient path
        inside a module call, so Opacus's per-sample gradients are exact.
        """
        v = _visible(x)
        _, mu2 = self.mean_field(v)
        with torch.no_grad():
            top_down = self._top_down(mu2)
        h1 = torch.sigmoid(self.layer1(v) + top_down)
        out: torch.Tensor = self.head(torch.sigmoid(self.layer2(h1)))
        return out

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Mean-field posterior ``mu2`` of the top layer, ``[B, hidden[1]]`` (no grad)."""
        return self.mean_field(_visible(inputs))[1]

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of the current phase (batch mean of per-sample terms)."""
        if self.phase == "pretrain":
            return self.reconstruction_loss_per_sample(inputs).mean()
        return F.cross_entropy(self(inputs), targets.long().reshape(-1))

    def reconstruction_modules(self) -> list[nn.Module]:
        """What :meth:`reconstruction_loss_per_sample` trains: both layers and the visible
        bias (the parameters of phase ``"pretrain"``), never the head."""
        return [self.layer1, self.layer2, self.visible_bias]

    def reconstruction_loss_per_sample(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample pretraining objective ``E(v, mu1, mu2) - E(v_m, h1_m, h2_m)``, ``[B]``.

        ``(mu1, mu2)`` is the data's mean-field posterior (data-dependent statistics) and
        ``(v_m, h1_m, h2_m)`` the end of a short block-Gibbs chain started at the data and a
        sample of ``mu2`` (model statistics), both per sample and without gradient
        (Salakhutdinov and Hinton, AISTATS 2009, with non-persistent chains so that row ``i``
        depends only on sample ``i``). Targets are not used.

        Parameters
        ----------
        inputs : torch.Tensor
            ``[B, C, *spatial]`` images with intensities in [0, 1].

        Returns
        -------
        torch.Tensor
            ``[B]`` surrogate terms whose gradients are the samples' DBM updates, negated.
        """
        v = _visible(inputs)
        mu1, mu2 = self.mean_field(v)
        v_m, h1_m, h2_m = self.gibbs(v, torch.bernoulli(mu2))
        data_term = self.negative_energy(v, mu1, mu2)
        return self.negative_energy(v_m, h1_m, h2_m) - data_term

    def reconstruction_error(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample squared error of ``p(v | mu1)`` after mean-field inference, ``[B]``."""
        v = _visible(inputs)
        mu1, _ = self.mean_field(v)
        with torch.no_grad():
            rec = torch.sigmoid(
                F.linear(mu1, self.layer1.weight.t(), self.visible_bias.weight.reshape(-1))
            )
            return ((rec - v) ** 2).mean(dim=1)


def _n_visible(in_channels: int, image_size: int, spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ConfigError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return int(in_channels * image_size**spatial_dims)


@register_model(
    "dbn",
    family="boltzmann",
    spatial_dims=(2, 3),
    tasks=("classification", "reconstruction", "pretraining"),
    description="DBN: 2 stacked Bernoulli RBMs (128-64), CD-1 layer-wise, then fine-tuning",
    # Vesalius's per-sample engine (client.training.per_sample) halves the DP cost of Opacus's
    # "hooks" here; per-mode DP/non-DP ratios are in bench/RESULTS.md (--timing-only).
    grad_sample_mode="direct",
)
def build_dbn(
    *, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, spatial_dims: int = 2
) -> nn.Module:
    """Build :class:`DBN` (phase ``"finetune"``); see :func:`common.models.registry.build_model`."""
    return DBN(_n_visible(in_channels, image_size, spatial_dims), num_classes)


@register_model(
    "dbm",
    family="boltzmann",
    spatial_dims=(2, 3),
    tasks=("classification", "reconstruction", "pretraining"),
    description="DBM: 2 hidden layers (128-64), joint mean-field + Gibbs training, head on h2",
    # Vesalius's per-sample engine (client.training.per_sample) halves the DP cost of Opacus's
    # "hooks" here; per-mode DP/non-DP ratios are in bench/RESULTS.md (--timing-only).
    grad_sample_mode="direct",
)
def build_dbm(
    *, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, spatial_dims: int = 2
) -> nn.Module:
    """Build :class:`DBM` (phase ``"finetune"``); see :func:`common.models.registry.build_model`."""
    return DBM(_n_visible(in_channels, image_size, spatial_dims), num_classes)
