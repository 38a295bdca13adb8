"""MONAI preprocessing to float32 [1, S, S] in [0, 1]."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.data.transforms import image_transform, preprocess


@pytest.mark.parametrize(("shape", "size"), [((128, 100), 32), ((16, 16), 28), ((300, 300), 64)])
def test_shape_dtype_range(shape: tuple[int, int], size: int) -> None:
    # Prepare: CT-like values with outliers
    rng = np.random.default_rng(0)
    image = rng.normal(40.0, 300.0, size=shape).astype(np.float32)
    image[0, 0] = 30000.0
    # Execute
    out = preprocess(image, size)
    # Assert
    assert isinstance(out, torch.Tensor) and out.dtype == torch.float32
    assert tuple(out.shape) == (1, size, size)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert float(out.max()) == pytest.approx(1.0)


def test_constant_image_maps_to_zero() -> None:
    # Execute
    out = preprocess(np.full((10, 10), -1000.0, dtype=np.float32), 8)
    # Assert
    assert torch.count_nonzero(out) == 0


def test_mostly_background_falls_back_to_min_max() -> None:
    # Prepare: a single bright pixel, percentiles coincide
    image = np.zeros((32, 32), dtype=np.float32)
    image[5, 5] = 7.0
    # Execute
    out = preprocess(image, 32)
    # Assert
    assert float(out.max()) == pytest.approx(1.0)
    assert float(out.min()) == 0.0


def test_invalid_size_rejected() -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="image_size"):
        image_transform(0)
