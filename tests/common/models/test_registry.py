"""Registry and contract tests over every registered model."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ConfigError
from common.models import (
    ModelSpec,
    build_model,
    count_parameters,
    get_spec,
    list_models,
    register_model,
)
from common.models.registry import _REGISTRY

MODEL_NAMES = [spec.name for spec in list_models()]


def test_cnn_is_registered_on_package_import() -> None:
    assert "cnn" in MODEL_NAMES
    spec = get_spec("cnn")
    assert isinstance(spec, ModelSpec)
    assert spec.family == "cnn" and 2 in spec.spatial_dims and "classification" in spec.tasks


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_passes_opacus_validator(name: str) -> None:
    model = build_model(name, image_size=32)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("size", "num_classes"), [(28, 2), (32, 2), (64, 3)])
def test_every_2d_model_maps_images_to_logits(name: str, size: int, num_classes: int) -> None:
    if 2 not in get_spec(name).spatial_dims:
        pytest.skip("not a 2D model")
    model = build_model(name, num_classes=num_classes, image_size=size)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ConfigError, match="cnn"):
        build_model("no-such-model")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"in_channels": 0}, {"image_size": 8}, {"spatial_dims": 3}],
)
def test_invalid_build_arguments_raise(kwargs: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        build_model("cnn", **kwargs)


def test_register_and_reject_duplicate() -> None:
    # Prepare
    @register_model(
        "test-linear", family="linear", spatial_dims=(2,), tasks=("classification",),
        description="test only",
    )
    def _build(*, in_channels: int, num_classes: int, image_size: int, spatial_dims: int) -> torch.nn.Module:
        return torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(in_channels * image_size**2, num_classes)
        )

    try:
        # Execute
        model = build_model("test-linear", image_size=4)
        # Assert
        assert count_parameters(model) == 16 * 2 + 2
        with pytest.raises(ConfigError, match="already registered"):
            register_model(
                "test-linear", family="x", spatial_dims=(2,), tasks=("c",), description=""
            )(_build)
    finally:
        _REGISTRY.pop("test-linear", None)


def test_cnn_is_small() -> None:
    assert count_parameters(build_model("cnn")) < 50_000
