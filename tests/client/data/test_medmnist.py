"""MedMNIST .npz loader (real BreastMNIST) and simulated-site splits."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from client.data.medmnist import load_medmnist, split_sites
from common.errors import DataError


def test_breastmnist_real_file(shared_file: Callable[[str], Path]) -> None:
    # Prepare
    path = shared_file("medmnist/breastmnist.npz")
    # Execute
    data = load_medmnist(path)
    # Assert
    assert set(data) == {"train", "val", "test"}
    images, labels = data["train"]
    assert images.dtype == np.float32 and images.shape[1:] == (1, 28, 28)
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    assert labels.dtype == np.int64 and labels.shape == (images.shape[0],)
    assert set(np.unique(labels).tolist()) == {0, 1}


def test_3d_and_missing_key(tmp_path: Path) -> None:
    # Prepare
    vol = np.zeros((2, 4, 4, 4), dtype=np.uint8)
    lab = np.zeros((2, 1), dtype=np.uint8)
    good = tmp_path / "vol.npz"
    np.savez(good, **{f"{s}_images": vol for s in ("train", "val", "test")},
             **{f"{s}_labels": lab for s in ("train", "val", "test")})
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=vol, train_labels=lab)
    # Execute
    data = load_medmnist(good)
    with pytest.raises(DataError) as info:
        load_medmnist(bad)
    # Assert
    assert data["val"][0].shape == (2, 1, 4, 4, 4)
    assert "val_images" in info.value.safe_reason and "test_labels" in info.value.safe_reason


def _labels(n: int = 600, classes: int = 3) -> np.ndarray:
    return (np.arange(n) % classes).reshape(-1, 1).astype(np.uint8)


@pytest.mark.parametrize("mode", ["iid", "dirichlet"])
def test_sites_disjoint_complete_deterministic(mode: str) -> None:
    # Prepare
    labels = _labels()
    # Execute
    sites = split_sites(labels, 5, mode=mode, seed=7)  # type: ignore[arg-type]
    again = split_sites(labels, 5, mode=mode, seed=7)  # type: ignore[arg-type]
    other = split_sites(labels, 5, mode=mode, seed=8)  # type: ignore[arg-type]
    # Assert
    merged = np.concatenate(sites)
    assert len(merged) == len(labels) and set(merged.tolist()) == set(range(len(labels)))
    assert all(s.dtype == np.int64 and len(s) >= 2 for s in sites)
    assert all(np.array_equal(a, b) for a, b in zip(sites, again))
    assert not all(np.array_equal(a, b) for a, b in zip(sites, other))


def test_dirichlet_small_alpha_skews_labels() -> None:
    # Prepare
    labels = _labels(3000, 2).ravel()

    def max_share(alpha: float) -> float:
        sites = split_sites(labels, 4, mode="dirichlet", alpha=alpha, seed=0, min_per_site=20)
        shares = [max(np.mean(labels[s] == 0), np.mean(labels[s] == 1)) for s in sites]
        return float(np.mean(shares))

    # Execute
    skewed, near_iid = max_share(0.1), max_share(100.0)
    # Assert
    assert skewed > 0.8
    assert near_iid < 0.6


def test_real_breastmnist_split(shared_file: Callable[[str], Path]) -> None:
    # Prepare
    _, labels = load_medmnist(shared_file("medmnist/breastmnist.npz"))["train"]
    # Execute
    sites = split_sites(labels, 3, mode="dirichlet", alpha=0.5, seed=0, min_per_site=10)
    # Assert
    assert sum(len(s) for s in sites) == len(labels)
    assert min(len(s) for s in sites) >= 10


def test_invalid_arguments() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="n_sites"):
        split_sites(_labels(10), 0)
    with pytest.raises(ValueError, match="at least"):
        split_sites(_labels(10), 6, min_per_site=2)
    with pytest.raises(ValueError, match="mode"):
        split_sites(_labels(10), 2, mode="nope")  # type: ignore[arg-type]
