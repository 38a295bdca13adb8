"""Test helpers: random data split into sites, and pooling of node statistics."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def split_indices(rng: np.random.Generator, n: int, k: int) -> list[np.ndarray]:
    """Random unequal split of ``range(n)`` into ``k`` non-empty sites."""
    cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False))
    perm = rng.permutation(n)
    return [np.sort(part) for part in np.split(perm, cuts)]


def scored_labels(
    rng: np.random.Generator, n: int, *, shift: float = 1.2, sd: float = 1.5,
    prevalence: float = 0.4,
) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and logistic scores that separate them (AUC about 0.7-0.8)."""
    y = (rng.random(n) < prevalence).astype(int)
    s = 1.0 / (1.0 + np.exp(-(rng.normal(size=n) * sd + shift * y - shift / 2)))
    return s, y


def bin_ranks(idx: Sequence[int]) -> np.ndarray:
    """Bin numbers as float 'scores' (binned scores of the pooled data)."""
    return np.asarray(idx, dtype=np.float64)
