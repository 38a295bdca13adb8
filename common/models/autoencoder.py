"""Deep autoencoders (plain, denoising, sparse), usable as pretrained encoders.

A fully connected encoder ``D -> 128 -> 32`` (ReLU) and a mirrored decoder ``32 -> 128 -> D``
reconstruct the flattened image; a linear head on the 32-dimensional code gives class logits,
so ``forward`` is a classifier and :meth:`DeepAutoencoder.embed` returns the code for use as
pretrained features.

Training objective (:meth:`DeepAutoencoder.dp_loss`, the model contract's hook, used by
:func:`client.training.train_dp`), per sample ``i`` and then averaged over the batch:

``mse(decoder(encoder(corrupt(x_i))), x_i)``
``+ sparsity_weight * mean(|code_i|)``   (sparse variant: an L1 activity penalty)
``+ label_weight * cross_entropy(head(code_i), y_i)``   (omitted when ``label_weight == 0``)

Each term depends on sample ``i`` only, so Opacus's per-sample clipping is valid; the terms
are exposed by :meth:`DeepAutoencoder.dp_loss_per_sample`, which lets the trainer use Opacus
ghost clipping. The first two terms, without the label term, are the model's self-supervised
objective for the ``reconstruction`` task (:meth:`DeepAutoencoder.reconstruction_loss_per_sample`;
it trains :meth:`~DeepAutoencoder.reconstruction_modules`, the encoder and decoder). The
denoising variant corrupts inputs with Gaussian noise during training (Vincent et al.,
"Extracting and composing robust features with denoising autoencoders", ICML 2008); the sparse
variant adds the L1 penalty on the code (a common relaxation of the KL sparsity target of Ng's
sparse autoencoder). With ``label_weight=0`` the objective is purely unsupervised (targets are
ignored and the head is frozen): pretrain so, then fine-tune with ``label_weight > 0``, put
an :class:`EncoderClassifier` (linear probe or fine-tuning) on the encoder, or feed
:meth:`~DeepAutoencoder.embed` features to another classifier.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn import functional as F

from common.errors import ConfigError
from common.models.registry import register_model

__all__ = ["VARIANTS", "DeepAutoencoder", "EncoderClassifier", "build_autoencoder"]

VARIANTS = ("plain", "denoising", "sparse")
"""Autoencoder variants; registered as ``autoencoder``, ``autoencoder-denoising``, ``-sparse``."""

MAX_INPUTS = 32**3
"""Largest flattened input accepted."""


class DeepAutoencoder(nn.Module):
    """Fully connected autoencoder with a classification head on its code.

    Parameters
    ----------
    input_shape : tuple of int
        Shape of one sample, ``(C, *spatial)``.
    num_classes : int
        Logits of the head.
    variant : {"plain", "denoising", "sparse"}, optional
        Training objective (see the module docstring).
    hidden : int, optional
        Width of the hidden layers.
    code : int, optional
        Width of the code (embedding).
    noise_std : float, optional
        Standard deviation of the Gaussian corruption (denoising variant).
    sparsity_weight : float, optional
        Weight of the L1 code penalty (sparse variant).
    label_weight : float, optional
        Weight of the supervised cross-entropy term; 0 trains unsupervised and freezes the head.
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_classes: int,
        *,
        variant: str = "plain",
        hidden: int = 128,
        code: int = 32,
        noise_std: float = 0.5,
        sparsity_weight: float = 0.05,
        label_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if variant not in VARIANTS:
            raise ConfigError(f"autoencoder variant must be one of {VARIANTS}, got {variant!r}")
        if not (math.isfinite(label_weight) and label_weight >= 0):
            raise ConfigError(f"label_weight must be finite and >= 0, got {label_weight}")
        self.input_shape = tuple(input_shape)
        self.variant = variant
        self.noise_std = float(noise_std)
        self.sparsity_weight = float(sparsity_weight) if variant == "sparse" else 0.0
        self.label_weight = float(label_weight)
        features = math.prod(self.input_shape)
        self.encoder = nn.Sequential(
            nn.Flatten(),
            nn.Linear(features, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, code),
            nn.ReLU(inplace=False),
        )
        self.decoder = nn.Sequential(
            nn.Linear(code, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, features),
        )
        self.head = nn.Linear(code, num_classes)
        if self.label_weight == 0.0:
            # Unused by the loss: Opacus would find no per-sample gradient for it.
            self.head.requires_grad_(False)

    def embed(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return the code ``[B, code]`` of ``[B, C, *spatial]`` inputs (pretrained features)."""
        code: torch.Tensor = self.encoder(inputs)
        return code

    def reconstruct(self, inputs: torch.Tensor) -> torch.Tensor:
        """Return the reconstruction of ``inputs``, same shape."""
        out: torch.Tensor = self.decoder(self.embed(inputs))
        return out.reshape(inputs.shape)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` inputs to ``[B, num_classes]`` logits (head on the code)."""
        out: torch.Tensor = self.head(self.embed(inputs))
        return out

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Batch mean of the per-sample objective of the module docstring.

        Parameters
        ----------
        inputs : torch.Tensor
            ``[B, C, *spatial]`` images.
        targets : torch.Tensor
            ``[B]`` class ids; ignored when ``label_weight == 0``.

        Returns
        -------
        torch.Tensor
            Scalar loss, the mean of :meth:`dp_loss_per_sample`.
        """
        return self.dp_loss_per_sample(inputs, targets).mean()

    def dp_loss_per_sample(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Per-sample objective ``[B]`` (lets the trainer use Opacus ghost clipping)."""
        return self._objective(inputs, targets if self.label_weight > 0 else None)

    def reconstruction_loss_per_sample(self, inputs: torch.Tensor) -> torch.Tensor:
        """Per-sample self-supervised objective ``[B]``: the module docstring's objective
        without its label term (denoising corruption and sparsity penalty included).

        Parameters
        ----------
        inputs : torch.Tensor
            ``[B, C, *spatial]`` images.

        Returns
        -------
        torch.Tensor
            ``[B]``: row ``i`` depends only on sample ``i``.
        """
        return self._objective(inputs, None)

    def reconstruction_modules(self) -> list[nn.Module]:
        """What :meth:`reconstruction_loss_per_sample` trains: the encoder and the decoder."""
        return [self.encoder, self.decoder]

    def _objective(self, inputs: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        """Per-sample objective; the label term only when ``targets`` is given."""
        corrupted = inputs
        if self.variant == "denoising" and self.training:
            corrupted = inputs + self.noise_std * torch.randn_like(inputs)
        code = self.embed(corrupted)
        recon = self.decoder(code)
        per_sample = (recon - inputs.flatten(1)).pow(2).mean(dim=1)
        if self.sparsity_weight > 0:
            per_sample = per_sample + self.sparsity_weight * code.abs().mean(dim=1)
        if targets is not None:
            ce = F.cross_entropy(self.head(code), targets.reshape(-1).long(), reduction="none")
            per_sample = per_sample + self.label_weight * ce
        return per_sample


class EncoderClassifier(nn.Module):
    """A classifier on the code of a (pretrained) :class:`DeepAutoencoder`.

    The encoder is copied from ``autoencoder`` (whose weights may come from federated
    pretraining, e.g. with ``label_weight=0`` on unlabelled images); a fresh linear head maps
    the code to logits. With ``freeze=True`` only the head is trained (the encoder's
    parameters have ``requires_grad=False``, which Opacus skips), a linear probe; otherwise
    the whole network is fine-tuned.

    Parameters
    ----------
    autoencoder : DeepAutoencoder
        Source of the encoder (copied; the argument is not modified).
    num_classes : int
        Logits of the new head.
    freeze : bool, optional
        Freeze the encoder.
    """

    def __init__(self, autoencoder: DeepAutoencoder, num_classes: int, *, freeze: bool = True) -> None:
        super().__init__()
        self.encoder = copy.deepcopy(autoencoder.encoder)
        if freeze:
            self.encoder.requires_grad_(False)
        code = autoencoder.head.in_features
        self.head = nn.Linear(code, num_classes)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` inputs to ``[B, num_classes]`` logits."""
        out: torch.Tensor = self.head(self.encoder(inputs))
        return out


def build_autoencoder(
    *, in_channels: int, num_classes: int, image_size: int, spatial_dims: int, variant: str = "plain"
) -> nn.Module:
    """Build a :class:`DeepAutoencoder` for ``[B, in_channels, *([image_size] * spatial_dims)]``."""
    shape = (in_channels,) + (image_size,) * spatial_dims
    if math.prod(shape) > MAX_INPUTS:
        raise ConfigError(
            f"autoencoder takes at most {MAX_INPUTS} input values, got {math.prod(shape)}; "
            "downsample the images"
        )
    return DeepAutoencoder(shape, num_classes, variant=variant)


_TASKS = ("classification", "reconstruction", "pretraining")

# The direct engine clips the Linear layers by ghost norms (client.training.ghost): no
# per-sample gradients materialised, no Opacus wrapper (bench/architectures.py --timing-only
# puts it beside Opacus's "ghost", the best stock mode, in the same run).
_MODE = "direct"

register_model(
    "autoencoder",
    family="autoencoder",
    spatial_dims=(2, 3),
    tasks=_TASKS,
    grad_sample_mode=_MODE,
    description="deep autoencoder D-128-32-128-D + head on the code (reconstruction + CE)",
)(build_autoencoder)


@register_model(
    "autoencoder-denoising",
    family="autoencoder",
    spatial_dims=(2, 3),
    tasks=_TASKS,
    grad_sample_mode=_MODE,
    description="denoising autoencoder (Gaussian corruption sigma 0.5) + head on the code",
)
def build_denoising_autoencoder(
    *, in_channels: int, num_classes: int, image_size: int, spatial_dims: int
) -> nn.Module:
    """Build the denoising variant of :class:`DeepAutoencoder`."""
    return build_autoencoder(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        spatial_dims=spatial_dims, variant="denoising",
    )


@register_model(
    "autoencoder-sparse",
    family="autoencoder",
    spatial_dims=(2, 3),
    tasks=_TASKS,
    grad_sample_mode=_MODE,
    description="sparse autoencoder (L1 code penalty 0.05) + head on the code",
)
def build_sparse_autoencoder(
    *, in_channels: int, num_classes: int, image_size: int, spatial_dims: int
) -> nn.Module:
    """Build the sparse variant of :class:`DeepAutoencoder`."""
    return build_autoencoder(
        in_channels=in_channels, num_classes=num_classes, image_size=image_size,
        spatial_dims=spatial_dims, variant="sparse",
    )
