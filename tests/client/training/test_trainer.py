"""DP trainer: oracle against plain SGD, composition of epsilon across rounds, API contract."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import TensorDataset

from client.training import TrainResult, select_device, train_dp
from common.errors import ConfigError, PrivacyConfigError
from common.models import build_model
from common.privacy import AccountantState, epsilon

DELTA = 1e-5


def _dataset(n: int = 64, size: int = 16, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, size, size, generator=gen)
    labels = torch.randint(0, 2, (n,), generator=gen)
    return TensorDataset(images, labels)


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", image_size=16)


def _plain_full_batch_sgd(
    model: nn.Module, data: TensorDataset, *, epochs: int, lr: float, momentum: float
) -> dict[str, torch.Tensor]:
    images, labels = data.tensors
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    for _ in range(epochs):
        opt.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        opt.step()
    return model.state_dict()


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("grad_sample_mode", ["hooks", "ghost"])
def test_no_noise_and_huge_clip_equals_plain_sgd(grad_sample_mode: str) -> None:
    # Prepare: batch_size == n gives sample_rate 1.0, so Poisson sampling takes every
    # record at every step (torch.rand < 1.0 always) and Opacus divides the summed
    # per-sample gradients by the expected batch size n == the mean loss gradient.
    data, model = _dataset(32), _model()
    expected = _plain_full_batch_sgd(copy.deepcopy(model), data, epochs=3, lr=0.1, momentum=0.9)
    # Execute
    result = train_dp(
        model, data, epochs=3, batch_size=32, learning_rate=0.1, noise_multiplier=0.0,
        max_grad_norm=1e6, delta=DELTA, seed=0, grad_sample_mode=grad_sample_mode,
    )
    # Assert
    assert result.sample_rate == 1.0 and result.steps == 3
    _assert_state_close(result.state_dict, expected)
    assert math.isinf(result.epsilon)  # no noise, no privacy


def test_non_private_path_equals_plain_sgd() -> None:
    data, model = _dataset(32), _model()
    expected = _plain_full_batch_sgd(copy.deepcopy(model), data, epochs=2, lr=0.1, momentum=0.9)
    prior = AccountantState().with_event(noise_multiplier=1.0, sample_rate=0.1, steps=5)
    result = train_dp(
        model, data, epochs=2, batch_size=32, learning_rate=0.1, noise_multiplier=1.0,
        max_grad_norm=1.0, delta=DELTA, private=False, prior=prior,
    )
    _assert_state_close(result.state_dict, expected)
    assert result.accountant_state == prior
    assert result.noise_multiplier == 0.0 and math.isinf(result.epsilon)


def test_clipping_bounds_the_update() -> None:
    # One step, no momentum, no noise, sample rate 1: ||update|| <= lr * C.
    data, model = _dataset(32), _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_dp(
        model, data, epochs=1, batch_size=32, learning_rate=1.0, noise_multiplier=0.0,
        max_grad_norm=1e-3, delta=DELTA, momentum=0.0,
    )
    diff = torch.cat([(result.state_dict[k] - before[k]).flatten() for k in before])
    assert 0 < float(diff.norm()) <= 1e-3 * (1 + 1e-5)


def test_epsilon_composes_over_rounds_like_a_fresh_opacus_accountant() -> None:
    # Prepare
    data, model = _dataset(64), _model()
    reference = RDPAccountant()
    prior: AccountantState | None = None
    epsilons: list[float] = []
    # Execute: three rounds, as three ClientApp instances would run them
    for round_noise in (1.0, 1.0, 1.3):
        result = train_dp(
            model, data, epochs=1, batch_size=16, learning_rate=0.05,
            noise_multiplier=round_noise, max_grad_norm=1.0, delta=DELTA, prior=prior, seed=1,
        )
        model.load_state_dict(result.state_dict)
        prior = result.accountant_state
        epsilons.append(result.epsilon)
        for _ in range(result.steps):
            reference.step(noise_multiplier=round_noise, sample_rate=result.sample_rate)
        # Assert
        assert result.steps == 4 and result.sample_rate == 0.25
        assert result.epsilon == pytest.approx(reference.get_epsilon(delta=DELTA), abs=1e-9)
    assert epsilons[0] < epsilons[1] < epsilons[2]
    assert prior is not None and prior.total_steps == 12
    assert epsilon(prior, delta=DELTA) == epsilons[-1]


def test_result_contract_and_caller_model_untouched() -> None:
    data, model = _dataset(40), _model()
    before = copy.deepcopy(model.state_dict())
    calls: list[tuple[int, int]] = []
    result = train_dp(
        model, data, epochs=2, batch_size=16, learning_rate=0.05, noise_multiplier=1.0,
        max_grad_norm=1.0, delta=DELTA, progress=lambda done, total: calls.append((done, total)),
    )
    assert isinstance(result, TrainResult)
    assert result.state_dict.keys() == model.state_dict().keys()
    assert not any(k.startswith("_module.") for k in result.state_dict)
    assert all(v.device.type == "cpu" for v in result.state_dict.values())
    assert result.num_examples == 40 and result.steps == 6 and result.delta == DELTA
    assert calls == [(i, 6) for i in range(1, 7)]
    assert math.isfinite(result.train_loss) and 0 < result.epsilon < math.inf
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())


def test_seed_makes_training_reproducible() -> None:
    data = _dataset(32)
    kwargs = dict(epochs=1, batch_size=8, learning_rate=0.05, noise_multiplier=1.0,
                  max_grad_norm=1.0, delta=DELTA, seed=7)
    a = train_dp(_model(), data, **kwargs)  # type: ignore[arg-type]
    b = train_dp(_model(), data, **kwargs)  # type: ignore[arg-type]
    for key in a.state_dict:
        assert torch.equal(a.state_dict[key], b.state_dict[key])


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"noise_multiplier": -1.0}, PrivacyConfigError),
        ({"max_grad_norm": 0.0}, PrivacyConfigError),
        ({"delta": 0.0}, PrivacyConfigError),
        ({"delta": 1.0}, PrivacyConfigError),
        ({"epochs": 0}, ConfigError),
        ({"batch_size": 0}, ConfigError),
        ({"learning_rate": 0.0}, ConfigError),
        ({"grad_sample_mode": "magic"}, ConfigError),
    ],
)
def test_invalid_arguments_raise(kwargs: dict[str, object], error: type[Exception]) -> None:
    args: dict[str, object] = dict(epochs=1, batch_size=8, learning_rate=0.05,
                                   noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA)
    args.update(kwargs)
    with pytest.raises(error):
        train_dp(_model(), _dataset(8), **args)  # type: ignore[arg-type]


def test_select_device_is_cpu_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert select_device() == torch.device("cpu")
    assert select_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="CUDA"):
        select_device("cuda")
