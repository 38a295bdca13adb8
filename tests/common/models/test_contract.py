"""Contract suite run over every registered model (see :mod:`common.models.registry`).

For each entry of :func:`common.models.list_models`: forward shape, Opacus validator clean,
one DP-SGD step through :func:`client.training.train_dp`, state-dict round trip through
Flower's ``ArrayRecord``, FedAvg of two copies (Flower's aggregation) against the manual
average, and a short federated run (2 sites x 3 rounds of ``train_dp`` + FedAvg) that lowers
the loss on held-out synthetic data. Models registered later (by any family module) are
covered automatically.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset

from client.training import train_dp
from common.models import ModelSpec, build_model, get_spec, list_models
from common.models.testing import example_batch, example_spatial_dims, is_segmentation

MODEL_NAMES = [spec.name for spec in list_models()]
SIZE = 16
DELTA = 1e-5


def _build(spec: ModelSpec, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(spec.name, image_size=SIZE, spatial_dims=example_spatial_dims(spec))


def _dataset(spec: ModelSpec, n: int, seed: int) -> TensorDataset:
    return TensorDataset(*example_batch(spec, batch_size=n, image_size=SIZE, seed=seed))


def _loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The training objective of the contract, evaluated without gradients in eval mode."""
    model.eval()
    with torch.no_grad():
        dp_loss = getattr(model, "dp_loss", None)
        if callable(dp_loss):
            return float(dp_loss(inputs, targets))
        return float(F.cross_entropy(model(inputs), targets))


def _trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _record(state: dict[str, torch.Tensor], num_examples: int) -> RecordDict:
    return RecordDict(
        {"arrays": ArrayRecord(state), "metrics": MetricRecord({"num-examples": num_examples})}
    )


def _fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Flower's FedAvg aggregation, as the server does it."""
    records = [_record(s, w) for s, w in zip(states, weights, strict=True)]
    return aggregate_arrayrecords(records, "num-examples").to_torch_state_dict()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name: str) -> None:
    spec = get_spec(name)
    inputs, targets = example_batch(spec, batch_size=3, image_size=SIZE, num_classes=3)
    model = build_model(name, num_classes=3, image_size=SIZE, spatial_dims=example_spatial_dims(spec))
    out = model(inputs)
    spatial = inputs.shape[2:]
    expected = (3, 3, *spatial) if is_segmentation(spec) else (3, 3)
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    if is_segmentation(spec):
        assert targets.shape == (3, *spatial)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_opacus_validator_is_clean(name: str) -> None:
    assert ModuleValidator.validate(_build(get_spec(name)), strict=True) == []


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_dp_sgd_step_uses_per_sample_gradients(name: str) -> None:
    # Prepare: no noise, so any weight change comes from clipped per-sample gradients
    # (Opacus raises if a trainable parameter got none).
    spec = get_spec(name)
    model = _build(spec)
    before = _trainable(model)
    data = _dataset(spec, 8, seed=1)
    # Execute: batch_size == n gives sample rate 1, i.e. one step.
    result = train_dp(
        model, data, epochs=1, batch_size=8, learning_rate=0.05, noise_multiplier=0.0,
        max_grad_norm=1.0, delta=DELTA, seed=0,
    )
    # Assert
    assert result.steps == 1 and math.isfinite(result.train_loss)
    assert set(result.state_dict) == set(model.state_dict())
    changed = [k for k, v in before.items() if not torch.equal(result.state_dict[k], v)]
    assert changed, "no trainable weight changed after a DP-SGD step"
    assert all(torch.isfinite(v).all() for v in result.state_dict.values() if v.is_floating_point())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_noisy_dp_step_reports_finite_epsilon(name: str) -> None:
    spec = get_spec(name)
    result = train_dp(
        _build(spec), _dataset(spec, 8, seed=2), epochs=1, batch_size=4, learning_rate=0.05,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, seed=0,
    )
    assert math.isfinite(result.epsilon) and result.epsilon > 0
    assert math.isfinite(result.train_loss)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_state_dict_round_trip_through_array_record(name: str) -> None:
    spec = get_spec(name)
    model, other = _build(spec, seed=0), _build(spec, seed=1)
    inputs, _ = example_batch(spec, batch_size=2, image_size=SIZE)
    restored = ArrayRecord(model.state_dict()).to_torch_state_dict()
    other.load_state_dict(restored)
    model.eval()
    other.eval()
    with torch.no_grad():
        torch.testing.assert_close(other(inputs), model(inputs), rtol=0, atol=0)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_fedavg_of_two_copies_is_the_weighted_average(name: str) -> None:
    spec = get_spec(name)
    a, b = _build(spec, seed=0).state_dict(), _build(spec, seed=1).state_dict()
    averaged = _fedavg([a, b], [30, 10])
    assert averaged.keys() == a.keys()
    for key in a:
        expected = (0.75 * a[key].double() + 0.25 * b[key].double()).numpy()
        np.testing.assert_allclose(averaged[key].double().numpy(), expected, rtol=1e-5, atol=1e-6)
    model = _build(spec, seed=2)
    model.load_state_dict(averaged)
    inputs, _ = example_batch(spec, batch_size=2, image_size=SIZE)
    assert torch.isfinite(model(inputs)).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_short_federated_run_improves_the_loss(name: str) -> None:
    # Prepare: 2 sites of 32 synthetic samples each, a held-out batch, fixed seeds.
    spec = get_spec(name)
    sites = [_dataset(spec, 32, seed=10 + k) for k in range(2)]
    held_out = example_batch(spec, batch_size=64, image_size=SIZE, seed=99)
    global_model = _build(spec)
    initial = _loss(copy.deepcopy(global_model), *held_out)
    # Execute: 3 rounds of local DP-SGD (light noise) at every site, then FedAvg.
    for rnd in range(3):
        results = [
            train_dp(
                global_model, site, epochs=2, batch_size=8, learning_rate=0.05,
                noise_multiplier=0.1, max_grad_norm=5.0, delta=DELTA, seed=100 * rnd + k,
            )
            for k, site in enumerate(sites)
        ]
        global_model.load_state_dict(
            _fedavg([r.state_dict for r in results], [r.num_examples for r in results])
        )
    final = _loss(global_model, *held_out)
    # Assert
    assert math.isfinite(final)
    assert final < initial, f"federated loss did not improve: {initial:.4f} -> {final:.4f}"
