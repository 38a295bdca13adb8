"""Loader for the official MedMNIST ``.npz`` files and a federated site splitter.

MedMNIST v2 (Yang et al., Scientific Data 10, 41, 2023) ships each dataset as one ``.npz``
with keys ``{train,val,test}_images`` (uint8; ``(N, H, W)`` greyscale 2-D,
``(N, H, W, 3)`` colour 2-D or ``(N, D, H, W)`` 3-D) and ``{train,val,test}_labels``
(``(N, 1)`` for single-label tasks, ``(N, K)`` for the multi-label ChestMNIST).

:func:`split_sites` simulates hospitals: IID, or label-skewed with per-class Dirichlet
proportions (Hsu et al., "Measuring the effects of non-identical data distribution for
federated visual classification", 2019).
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from common.errors import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
#: Attempts of :func:`split_sites` before giving up on ``min_per_site``.
MAX_DIRICHLET_DRAWS = 1000

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]


def _images_channel_first(images: npt.NDArray[np.generic]) -> FloatArray:
    """uint8 -> float32 in [0, 1] with a channel axis at position 1."""
    scaled = images.astype(np.float32) / 255.0
    if scaled.ndim == 3:  # (N, H, W) greyscale
        return scaled[:, None]
    if scaled.ndim == 4 and scaled.shape[-1] == 3 and scaled.shape[1] != 3:  # colour, last axis
        return np.ascontiguousarray(np.moveaxis(scaled, -1, 1))
    if scaled.ndim == 4:  # (N, D, H, W) volumes
        return scaled[:, None]
    raise DataError(
        f"unexpected MedMNIST image array shape {images.shape}",
        safe_reason="unexpected MedMNIST image array shape",
    )


def load_medmnist(path: str | Path) -> dict[str, tuple[FloatArray, IntArray]]:
    """Load a MedMNIST ``.npz`` file.

    Parameters
    ----------
    path : str | Path
        The ``.npz`` file (e.g. ``breastmnist.npz``).

    Returns
    -------
    dict[str, tuple[numpy.ndarray, numpy.ndarray]]
        ``{"train"|"val"|"test": (images, labels)}``. Images are float32 in [0, 1] with a
        channel axis: ``(N, 1, H, W)``, ``(N, 3, H, W)`` or ``(N, 1, D, H, W)``. Labels
        are int64, flat ``(N,)`` for single-label data, ``(N, K)`` for multi-label data.

    Raises
    ------
    DataError
        Unreadable file, a missing key, or image/label counts that disagree.
    """
    try:
        archive = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"cannot read MedMNIST file {path}: {exc}",
            safe_reason="the MedMNIST file could not be read",
        ) from exc
    with archive:
        missing = [
            f"{split}_{kind}"
            for split in SPLITS
            for kind in ("images", "labels")
            if f"{split}_{kind}" not in archive.files
        ]
        if missing:
            raise DataError(
                f"MedMNIST file {path} lacks key(s) {missing}; found {sorted(archive.files)}",
                safe_reason="the MedMNIST file lacks key(s) " + ", ".join(missing),
            )
        out: dict[str, tuple[FloatArray, IntArray]] = {}
        for split in SPLITS:
            images = _images_channel_first(archive[f"{split}_images"])
            labels = np.asarray(archive[f"{split}_labels"]).astype(np.int64)
            if labels.ndim == 2 and labels.shape[1] == 1:
                labels = labels.reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise DataError(
                    f"{split}: {images.shape[0]} images but {labels.shape[0]} labels",
                    safe_reason="MedMNIST image and label counts disagree",
                )
            out[split] = (images, labels)
    logger.info(
        "MedMNIST: %s images", {k: v[0].shape[0] for k, v in out.items()}
    )
    return out


def _check_split_args(n: int, n_sites: int, min_per_site: int, alpha: float) -> None:
    if n_sites < 1:
        raise ValueError(f"n_sites must be >= 1, got {n_sites}")
    if min_per_site < 0:
        raise ValueError(f"min_per_site must be >= 0, got {min_per_site}")
    if n_sites * min_per_site > n:
        raise ValueError(
            f"{n} items cannot give {n_sites} sites at least {min_per_site} items each"
        )
    if alpha <= 0:
        raise ValueError(f"alpha (Dirichlet concentration) must be > 0, got {alpha}")


def _dirichlet_draw(
    labels: IntArray, n_sites: int, alpha: float, rng: np.random.Generator
) -> list[list[IntArray]]:
    parts: list[list[IntArray]] = [[] for _ in range(n_sites)]
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls)).astype(np.int64)
        shares = rng.dirichlet(np.full(n_sites, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for site, chunk in enumerate(np.split(members, cuts)):
            parts[site].append(chunk)
    return parts


def split_sites(
    labels: npt.NDArray[np.integer],
    n_sites: int,
    *,
    mode: Literal["iid", "dirichlet"] = "iid",
    alpha: float = 0.5,
    seed: int = 0,
    min_per_site: int = 2,
) -> list[IntArray]:
    """Partition item indices among simulated sites.

    Parameters
    ----------
    labels : numpy.ndarray
        Labels of the items, ``(N,)`` or ``(N, 1)``; for multi-label data the first column
        drives the Dirichlet skew.
    n_sites : int
        Number of sites.
    mode : {"iid", "dirichlet"}, keyword-only
        ``"iid"``: a random permutation cut into near-equal parts. ``"dirichlet"``: for
        each class, site shares drawn from Dirichlet(alpha, ..., alpha); small ``alpha``
        means strong label skew, large ``alpha`` approaches IID.
    alpha : float, keyword-only
        Dirichlet concentration (> 0); only used by ``"dirichlet"``.
    seed : int, keyword-only
        Seed of NumPy's ``default_rng``; same inputs and seed give the same partition.
    min_per_site : int, keyword-only
        Dirichlet draws are repeated (up to :data:`MAX_DIRICHLET_DRAWS` times) until every
        site has at least this many items.

    Returns
    -------
    list[numpy.ndarray]
        One sorted int64 index array per site; disjoint and covering ``range(N)``.
    """
    flat = np.asarray(labels)
    flat = (flat.reshape(flat.shape[0], -1)[:, 0] if flat.ndim > 1 else flat).astype(np.int64)
    n = int(flat.shape[0])
    _check_split_args(n, n_sites, min_per_site, alpha)
    rng = np.random.default_rng(seed)
    if mode == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(n), n_sites)]
    if mode != "dirichlet":
        raise ValueError(f"mode must be 'iid' or 'dirichlet', got {mode!r}")
    for _ in range(MAX_DIRICHLET_DRAWS):
        parts = _dirichlet_draw(flat, n_sites, alpha, rng)
        sites = [np.sort(np.concatenate(p)).astype(np.int64) for p in parts]
        if min(len(s) for s in sites) >= min_per_site:
            return sites
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) draw gave every one of {n_sites} sites "
        f"{min_per_site} items in {MAX_DIRICHLET_DRAWS} attempts; raise alpha or lower min_per_site"
    )
