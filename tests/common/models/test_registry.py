"""Registry and contract tests over every registered model."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from common.errors import ConfigError
from common.models import (
    GRAD_SAMPLE_MODES,
    INPUT_KINDS,
    TASKS,
    ModelSpec,
    build_model,
    count_parameters,
    get_spec,
    list_models,
    register_model,
    spec_of,
)
from common.models.registry import _REGISTRY
from common.models.testing import example_batch

MODEL_NAMES = [spec.name for spec in list_models()]


def test_cnn_is_registered_on_package_import() -> None:
    assert "cnn" in MODEL_NAMES
    spec = get_spec("cnn")
    assert isinstance(spec, ModelSpec)
    assert spec.family == "cnn" and 2 in spec.spatial_dims and "classification" in spec.tasks


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_passes_opacus_validator(name: str) -> None:
    dims = get_spec(name).spatial_dims[0]
    model = build_model(name, image_size=32 if dims == 2 else 16, spatial_dims=dims)
    assert ModuleValidator.validate(model, strict=False) == []


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("size", "num_classes"), [(28, 2), (32, 2), (64, 3)])
def test_every_2d_model_maps_images_to_logits(name: str, size: int, num_classes: int) -> None:
    spec = get_spec(name)
    if 2 not in spec.spatial_dims or "classification" not in spec.tasks:
        pytest.skip("not a 2D classifier (segmentation shapes: test_contract.py)")
    model = build_model(name, num_classes=num_classes, image_size=size)
    out = model(torch.randn(3, 1, size, size))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_unknown_name_lists_known_models() -> None:
    with pytest.raises(ConfigError, match="cnn"):
        build_model("no-such-model")


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 0}, {"in_channels": 0}, {"image_size": 8}, {"spatial_dims": 3}],
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
                "test-linear", family="x", spatial_dims=(2,), tasks=("classification",),
                description="",
            )(_build)
    finally:
        _REGISTRY.pop("test-linear", None)


def test_cnn_is_small() -> None:
    assert count_parameters(build_model("cnn")) < 50_000


def test_build_model_tags_the_module_with_its_spec() -> None:
    model = build_model("cnn", image_size=16)
    spec = spec_of(model)
    assert spec is not None and spec.name == "cnn"
    assert spec_of(torch.nn.Linear(2, 2)) is None


def test_spec_of_sees_through_an_opacus_wrapper() -> None:
    from opacus import GradSampleModule

    wrapped = GradSampleModule(build_model("mlp", image_size=16))
    assert spec_of(wrapped) == get_spec("mlp")


@pytest.mark.parametrize(
    "kwargs",
    [{"tasks": ("dreaming",)}, {"grad_sample_mode": "magic"}, {"input_kind": "text"}],
)
def test_register_rejects_values_outside_the_vocabulary(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {
        "family": "x", "spatial_dims": (2,), "tasks": ("classification",), "description": "",
    }
    args.update(kwargs)
    with pytest.raises(ConfigError):
        register_model("test-bad", **args)  # type: ignore[arg-type]
    assert "test-bad" not in _REGISTRY


def test_registered_modes_and_tasks_are_in_the_vocabulary() -> None:
    for spec in list_models():
        assert spec.grad_sample_mode in GRAD_SAMPLE_MODES
        assert set(spec.tasks) <= set(TASKS)
        assert spec.input_kind in INPUT_KINDS


def test_models_with_dp_loss_register_a_mode_that_sees_it() -> None:
    for spec in list_models():
        dims = spec.spatial_dims[0]
        model = build_model(spec.name, image_size=16, spatial_dims=dims)
        if callable(getattr(model, "dp_loss_per_sample", None)):
            assert spec.grad_sample_mode in ("hooks", "functorch", "ghost", "direct"), spec.name
            x, y = example_batch(spec, batch_size=5, image_size=16)
            model.eval()  # no random corruption
            per_sample = model.dp_loss_per_sample(x, y)
            assert per_sample.shape == (5,)
            torch.testing.assert_close(model.dp_loss(x, y), per_sample.mean())
        elif callable(getattr(model, "dp_loss", None)):
            assert spec.grad_sample_mode in ("hooks", "functorch", "direct"), spec.name
