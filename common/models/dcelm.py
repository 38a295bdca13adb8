"""Deep convolutional extreme learning machine (DC-ELM) with a closed-form ridge readout.

An extreme learning machine (Huang, Zhu and Siew, "Extreme learning machine: theory and
applications", Neurocomputing 70, 2006) keeps its hidden layers *random and fixed* and only
fits the output weights, by regularised least squares. The convolutional variant used here
(in the spirit of Pang and Yang, "Deep convolutional extreme learning machine and its
application in handwritten digit classification", 2016) uses two seeded random convolution
layers as the feature extractor:

    x -> conv(8, k5) -> ReLU -> avgpool(2) -> conv(16, k3) -> ReLU -> adaptive avgpool -> H

``H`` gets a constant bias column, and the readout ``beta`` solves the ridge problem

    beta = (H^T H + lambda I)^-1 H^T Y,     Y one-hot,

so the logits are ``H @ beta``. The filters are buffers drawn from a fixed seed
(:data:`FEATURE_SEED`), so every hospital builds *the same* extractor without exchanging it,
they are never trained, and FedAvg leaves them unchanged.

Federation: the sufficient statistics are sums over samples, so the hospitals' ``(H^T H,
H^T Y)`` add up to the pooled statistics and :meth:`DCELM.solve_readout` on the sums gives
exactly the pooled closed-form solution, in one round. With DP, each hospital releases
:func:`noisy_statistics` (the "Analyze Gauss" mechanism of Dwork, Talwar, Thakurta and Zhang,
STOC 2014, applied to the augmented matrix). The readout is also an ordinary bias-free
``nn.Linear``, so it can be trained with DP-SGD like any other model.
"""

from __future__ import annotations

import math
import secrets
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from common.errors import ConfigError, PrivacyConfigError
from common.models.registry import register_model

__all__ = ["DCELM", "build_dcelm", "noisy_statistics", "readout_row_scale"]

FEATURE_SEED = 0
"""Seed of the random filters; identical at every hospital by construction."""

MIN_IMAGE_SIZE = 8
"""Smallest side length (one 2x pooling, then an adaptive pooling)."""

_CHANNELS = (8, 16)
_KERNELS = (5, 3)
_GRID = {2: 4, 3: 2}  # adaptive pooling output side per spatial dimensionality


def _random_filters(
    generator: torch.Generator, out_ch: int, in_ch: int, kernel: int, spatial_dims: int
) -> torch.Tensor:
    """Zero-mean random filters with variance 2 / fan_in (He scaling keeps ReLU outputs O(1))."""
    shape = (out_ch, in_ch, *([kernel] * spatial_dims))
    fan_in = in_ch * kernel**spatial_dims
    w = torch.randn(shape, generator=generator) * math.sqrt(2.0 / fan_in)
    return w - w.mean(dim=tuple(range(1, w.dim())), keepdim=True)


class DCELM(nn.Module):
    """Random convolutional features with a ridge-regression readout.

    Parameters
    ----------
    in_channels : int
        Input channels.
    num_classes : int
        Output logits ``k``.
    spatial_dims : int, optional
        2 (images) or 3 (volumes).
    seed : int, optional
        Seed of the fixed random filters (:data:`FEATURE_SEED`); hospitals must agree on it.

    Attributes
    ----------
    readout : torch.nn.Linear
        Bias-free ``Linear(d, k)``; its weight is ``beta^T``. The bias is the last feature,
        a constant 1 (see :meth:`features`).
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 2,
        *,
        spatial_dims: int = 2,
        seed: int = FEATURE_SEED,
    ) -> None:
        super().__init__()
        if spatial_dims not in _GRID:
            raise ConfigError(f"DC-ELM supports spatial_dims 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.num_classes = num_classes
        gen = torch.Generator().manual_seed(seed)
        c1, c2 = _CHANNELS
        k1, k2 = _KERNELS
        self.register_buffer("filters1", _random_filters(gen, c1, in_channels, k1, spatial_dims))
        self.register_buffer("filters2", _random_filters(gen, c2, c1, k2, spatial_dims))
        self.feature_dim = c2 * _GRID[spatial_dims] ** spatial_dims + 1
        self.readout = nn.Linear(self.feature_dim, num_classes, bias=False)

    # ----------------------------------------------------------------- features
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the fixed random features ``H [B, d]``, last column the constant 1.

        No gradient flows into the filters (they are buffers), so the features of a sample
        depend only on that sample.
        """
        conv = F.conv2d if self.spatial_dims == 2 else F.conv3d
        pool = F.avg_pool2d if self.spatial_dims == 2 else F.avg_pool3d
        adaptive = F.adaptive_avg_pool2d if self.spatial_dims == 2 else F.adaptive_avg_pool3d
        f1: torch.Tensor = self.filters1  # type: ignore[assignment]
        f2: torch.Tensor = self.filters2  # type: ignore[assignment]
        h = F.relu(conv(x, f1, padding=_KERNELS[0] // 2))
        h = pool(h, 2)
        h = F.relu(conv(h, f2, padding=_KERNELS[1] // 2))
        h = torch.flatten(adaptive(h, _GRID[self.spatial_dims]), 1)
        ones = torch.ones((h.shape[0], 1), dtype=h.dtype, device=h.device)
        return torch.cat([h, ones], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[B, C, *spatial]`` to logits ``H @ beta``, shape ``[B, num_classes]``."""
        return self.readout(self.features(x))

    # ----------------------------------------------------------------- closed form
    def readout_statistics(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        clip: float | None = None,
        patient_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Return the sufficient statistics ``(H^T H [d, d], H^T Y [d, k], n)`` of a batch.

        These sums are what a hospital releases; they add up across hospitals and batches.

        Parameters
        ----------
        x : torch.Tensor
            Images ``[N, C, *spatial]``.
        y : torch.Tensor
            Integer class labels ``[N]``; encoded one-hot.
        clip : float, optional, keyword-only
            Per-*patient* L2 bound for differential privacy (see :func:`noisy_statistics`):
            each row ``h`` is scaled by :func:`readout_row_scale` so that the sum of the row
            norms of one patient is at most ``clip``. ``None`` leaves rows unscaled.
        patient_index : torch.Tensor, optional, keyword-only
            ``[N]`` patient of each row; with ``clip``, a patient with ``m`` images gets
            ``clip / m`` per row. Without it every row counts as its own patient.

        Returns
        -------
        tuple
            float64 ``HtH``, float64 ``HtY`` and the number of rows ``n``.
        """
        with torch.no_grad():
            h = self.features(x).to(torch.float64)
        if clip is not None:
            h = h * readout_row_scale(h, clip=clip, patient_index=patient_index)[:, None]
        y_onehot = F.one_hot(y.long().reshape(-1), self.num_classes).to(torch.float64)
        return h.T @ h, h.T @ y_onehot, int(h.shape[0])

    @staticmethod
    def solve_readout(hth: torch.Tensor, hty: torch.Tensor, ridge: float) -> torch.Tensor:
        """Return ``beta = (HtH + ridge * I)^-1 HtY`` (float64, ``[d, k]``).

        Raises
        ------
        ConfigError
            If ``ridge`` is negative or not finite.
        """
        if not math.isfinite(ridge) or ridge < 0:
            raise ConfigError(f"ridge must be a finite number >= 0, got {ridge}")
        a = hth.to(torch.float64)
        # Symmetrise first: noisy or summed statistics may carry rounding asymmetry.
        a = 0.5 * (a + a.T) + ridge * torch.eye(a.shape[0], dtype=torch.float64)
        return torch.linalg.solve(a, hty.to(torch.float64))

    def set_readout(self, beta: torch.Tensor) -> None:
        """Load ``beta [d, k]`` into the readout (``weight = beta^T``)."""
        expected = (self.feature_dim, self.num_classes)
        if tuple(beta.shape) != expected:
            raise ConfigError(f"beta must have shape {expected}, got {tuple(beta.shape)}")
        with torch.no_grad():
            self.readout.weight.copy_(beta.T.to(self.readout.weight.dtype))

    def fit_readout(self, x: torch.Tensor, y: torch.Tensor, *, ridge: float) -> torch.Tensor:
        """Fit the readout on one batch in closed form (centralised use); return ``beta``."""
        hth, hty, _ = self.readout_statistics(x, y)
        beta = self.solve_readout(hth, hty, ridge)
        self.set_readout(beta)
        return beta


def readout_row_scale(
    h: torch.Tensor, *, clip: float, patient_index: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-row factors in (0, 1] bounding each patient's summed row norm by ``clip``.

    A patient with ``m`` rows has each row clipped to norm ``clip / m``, so that the sum of
    that patient's row norms is at most ``clip`` (see :func:`noisy_statistics`).
    """
    if not math.isfinite(clip) or clip <= 0:
        raise PrivacyConfigError(f"clip must be > 0, got {clip}")
    if patient_index is None:
        per_row = torch.full((h.shape[0],), float(clip), dtype=h.dtype, device=h.device)
    else:
        idx = patient_index.long().reshape(-1)
        counts = torch.bincount(idx).to(h.dtype)
        per_row = clip / counts[idx]
    norms = torch.linalg.vector_norm(h, dim=1)
    return torch.clamp(per_row / torch.clamp(norms, min=1e-12), max=1.0)


def noisy_statistics(
    hth: torch.Tensor,
    hty: torch.Tensor,
    *,
    noise_multiplier: float,
    clip: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Release ``(HtH, HtY)`` with the Gaussian mechanism; return them and its description.

    Sensitivity (add/remove one patient). The statistics must have been computed with
    ``readout_statistics(..., clip=clip, patient_index=...)``, so that one patient's rows
    satisfy ``sum_i ||h_i|| <= clip``, and labels are one-hot (``||y_i|| = 1``). That patient
    changes

    * ``HtH`` by ``sum_i h_i h_i^T``, of Frobenius norm ``<= sum_i ||h_i||^2 <= clip^2``;
    * ``HtY`` by ``sum_i h_i y_i^T``, of Frobenius norm ``<= sum_i ||h_i|| <= clip``.

    The released vector is (upper triangle of ``HtH`` including the diagonal, ``HtY``), whose
    change is at most the above, so its L2 sensitivity is ``Delta = sqrt(clip^4 + clip^2)``.
    Independent ``N(0, (noise_multiplier * Delta)^2)`` noise is added to every entry of that
    vector and the triangle is mirrored, so the noisy ``HtH`` stays symmetric (Analyze Gauss,
    Dwork et al., STOC 2014). This is one Gaussian mechanism with noise multiplier
    ``noise_multiplier`` over the whole dataset (sampling rate 1, one step).

    Privacy caveat: the noisy ``HtH`` need not be positive definite; the ridge passed to
    :meth:`DCELM.solve_readout` should exceed a few times the noise scale. The noise is
    pseudo-random (``torch.Generator``), adequate for research, not for a formal release.

    Parameters
    ----------
    hth, hty : torch.Tensor
        Clipped statistics ``[d, d]`` and ``[d, k]``.
    noise_multiplier : float, keyword-only
        Noise standard deviation in units of the sensitivity; must be > 0.
    clip : float, keyword-only
        The per-patient bound used when computing the statistics.
    generator : torch.Generator, optional, keyword-only
        Noise source; by default one seeded from OS entropy (never the global RNG).

    Returns
    -------
    tuple
        Noisy ``HtH`` (symmetric), noisy ``HtY`` and the mechanism
        ``{"kind": "gaussian", "noise_multiplier": ..., "steps": 1}`` for the privacy ledger.
    """
    if not math.isfinite(noise_multiplier) or noise_multiplier <= 0:
        raise PrivacyConfigError(
            f"noise_multiplier must be > 0 for a private release, got {noise_multiplier}"
        )
    if not math.isfinite(clip) or clip <= 0:
        raise PrivacyConfigError(f"clip must be > 0, got {clip}")
    if generator is None:
        generator = torch.Generator().manual_seed(secrets.randbits(63))
    sensitivity = math.sqrt(clip**4 + clip**2)
    std = noise_multiplier * sensitivity
    a = hth.to(torch.float64)
    d = a.shape[0]
    raw = torch.randn((d, d), generator=generator, dtype=torch.float64) * std
    upper = torch.triu(raw)
    sym_noise = upper + torch.triu(raw, diagonal=1).T
    noise_y = torch.randn(tuple(hty.shape), generator=generator, dtype=torch.float64) * std
    mechanism: dict[str, Any] = {
        "kind": "gaussian",
        "noise_multiplier": float(noise_multiplier),
        "steps": 1,
    }
    return a + sym_noise, hty.to(torch.float64) + noise_y, mechanism


@register_model(
    "dc-elm",
    family="elm",
    spatial_dims=(2, 3),
    tasks=("classification",),
    description="DC-ELM: 2 seeded random conv layers (8-16 ch) + ridge readout in closed form",
    # Vesalius's per-sample engine (client.training.per_sample): DP/non-DP 1.22 vs 1.27-1.37
    # for Opacus's modes (bench/RESULTS.md, --timing-only).
    grad_sample_mode="direct",
)
def build_dcelm(
    *, in_channels: int = 1, num_classes: int = 2, image_size: int = 32, spatial_dims: int = 2
) -> nn.Module:
    """Build :class:`DCELM`; see :func:`common.models.registry.build_model`."""
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"model 'dc-elm' needs image_size >= {MIN_IMAGE_SIZE}, got {image_size}"
        )
    return DCELM(in_channels=in_channels, num_classes=num_classes, spatial_dims=spatial_dims)
