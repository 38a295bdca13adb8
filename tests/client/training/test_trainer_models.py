"""Trainer x model contract: the ``dp_loss`` hook, segmentation targets, per-spec Opacus mode."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import TensorDataset

from client.training import resolve_grad_sample_mode, train_dp
from client.training import trainer as trainer_module
from common.errors import ConfigError
from common.models import build_model, get_spec
from common.models.testing import example_batch

DELTA = 1e-5


def _assert_state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def _plain_sgd(
    model: nn.Module, loss_fn: Any, epochs: int, lr: float, losses: list[float] | None = None
) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
    for _ in range(epochs):
        opt.zero_grad()
        loss = loss_fn(model)
        loss.backward()
        opt.step()
        if losses is not None:
            losses.append(float(loss.detach()))
    return model.state_dict()


def test_resolve_mode_prefers_explicit_then_registry_then_hooks() -> None:
    mlp = build_model("mlp", image_size=16)
    assert resolve_grad_sample_mode(mlp) == get_spec("mlp").grad_sample_mode
    assert resolve_grad_sample_mode(mlp, "functorch") == "functorch"
    assert resolve_grad_sample_mode(nn.Linear(3, 2)) == "hooks"


@pytest.mark.parametrize("name", ["cnn", "mlp", "autoencoder"])
def test_train_dp_uses_the_registered_mode_by_default(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: spy on the mode handed to Opacus.
    seen: list[str] = []

    class SpyEngine(PrivacyEngine):
        def make_private(self, **kwargs: Any) -> Any:
            seen.append(kwargs["grad_sample_mode"])
            return super().make_private(**kwargs)

    monkeypatch.setattr(trainer_module, "PrivacyEngine", SpyEngine)
    direct = trainer_module.make_private_direct

    def spy_direct(*args: Any, **kwargs: Any) -> Any:
        seen.append("direct")
        return direct(*args, **kwargs)

    monkeypatch.setattr(trainer_module, "make_private_direct", spy_direct)
    spec = get_spec(name)
    data = TensorDataset(*example_batch(spec, batch_size=8, image_size=16))
    # Execute
    train_dp(
        build_model(name, image_size=16), data, epochs=1, batch_size=8, learning_rate=0.1,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, seed=0,
    )
    # Assert
    assert seen == [spec.grad_sample_mode]


def test_dp_loss_with_no_noise_and_huge_clip_equals_plain_sgd_on_dp_loss() -> None:
    # Prepare: full batch (sample rate 1), so DP-SGD without noise or clipping is plain SGD
    # on the model's own dp_loss -- only if Opacus saw every layer call inside dp_loss.
    spec = get_spec("autoencoder")
    images, labels = example_batch(spec, batch_size=16, image_size=8, seed=3)
    torch.manual_seed(0)
    model = build_model("autoencoder", image_size=8)
    losses: list[float] = []
    expected = _plain_sgd(
        copy.deepcopy(model), lambda m: m.dp_loss(images, labels), epochs=3, lr=0.1,
        losses=losses,
    )
    # Execute
    result = train_dp(
        model, TensorDataset(images, labels), epochs=3, batch_size=16, learning_rate=0.1,
        noise_multiplier=0.0, max_grad_norm=1e6, delta=DELTA, seed=0, grad_sample_mode="hooks",
    )
    # Assert
    _assert_state_close(result.state_dict, expected)
    assert result.train_loss == pytest.approx(sum(losses) / len(losses), rel=1e-4)


def test_dp_loss_is_clipped_per_sample() -> None:
    # With a tiny clip bound and no noise, one full-batch step moves the weights by at most
    # lr * C (the mean of clipped per-sample gradients has norm <= C).
    spec = get_spec("autoencoder")
    images, labels = example_batch(spec, batch_size=16, image_size=8, seed=4)
    torch.manual_seed(0)
    model = build_model("autoencoder", image_size=8)
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    result = train_dp(
        model, TensorDataset(images, labels), epochs=1, batch_size=16, learning_rate=1.0,
        noise_multiplier=0.0, max_grad_norm=1e-3, delta=DELTA, seed=0, momentum=0.0,
    )
    after = torch.cat([result.state_dict[n].flatten() for n, _ in model.named_parameters()])
    step = float((after - before).norm())
    assert 0 < step <= 1e-3 * (1 + 1e-4)


class _MeanOnlyLoss(nn.Module):
    """A model with ``dp_loss`` but no ``dp_loss_per_sample``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.fc(inputs).pow(2).mean()


@pytest.mark.parametrize(
    ("make", "mode"),
    [
        (lambda: build_model("autoencoder", image_size=8), "ew"),
        (_MeanOnlyLoss, "ew"),
        (_MeanOnlyLoss, "ghost"),
    ],
)
def test_dp_loss_models_refuse_modes_that_bypass_it(make: Any, mode: str) -> None:
    model = make()
    inputs = torch.randn(8, 1, 8, 8) if not isinstance(model, _MeanOnlyLoss) else torch.randn(8, 4)
    data = TensorDataset(inputs, torch.randint(0, 2, (8,)))
    with pytest.raises(ConfigError, match="dp_loss"):
        train_dp(
            model, data, epochs=1, batch_size=8, learning_rate=0.1, noise_multiplier=1.0,
            max_grad_norm=1.0, delta=DELTA, grad_sample_mode=mode,
        )


@pytest.mark.parametrize("name", ["autoencoder", "autoencoder-sparse"])
def test_ghost_clipping_on_per_sample_dp_loss_equals_hooks(name: str) -> None:
    # With a clip bound that binds (0.05) and no noise, ghost clipping through
    # dp_loss_per_sample must give the same weights as materialised per-sample gradients.
    spec = get_spec(name)
    images, labels = example_batch(spec, batch_size=16, image_size=8, seed=7)
    torch.manual_seed(0)
    model = build_model(name, image_size=8)
    kwargs: dict[str, Any] = dict(
        epochs=3, batch_size=16, learning_rate=0.1, noise_multiplier=0.0, max_grad_norm=0.05,
        delta=DELTA, seed=0,
    )
    data = TensorDataset(images, labels)
    hooks = train_dp(model, data, grad_sample_mode="hooks", **kwargs)
    ghost = train_dp(model, data, grad_sample_mode="ghost", **kwargs)
    _assert_state_close(ghost.state_dict, hooks.state_dict)
    assert ghost.train_loss == pytest.approx(hooks.train_loss, rel=1e-5)


class _PixelClassifier(nn.Module):
    """A 1x1 convolution: per-pixel logits, the shape contract of a segmentation model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def test_segmentation_masks_keep_their_shape_and_train_on_pixel_cross_entropy() -> None:
    # Prepare
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(12, 1, 6, 6, generator=gen)
    masks = (images[:, 0] > 0.5).long()
    torch.manual_seed(0)
    model = _PixelClassifier()
    expected = _plain_sgd(
        copy.deepcopy(model),
        lambda m: nn.functional.cross_entropy(m(images), masks), epochs=3, lr=0.5,
    )
    # Execute
    result = train_dp(
        model, TensorDataset(images, masks), epochs=3, batch_size=12, learning_rate=0.5,
        noise_multiplier=0.0, max_grad_norm=1e6, delta=DELTA, seed=0,
    )
    # Assert
    _assert_state_close(result.state_dict, expected)


def test_non_private_path_uses_dp_loss() -> None:
    spec = get_spec("autoencoder-sparse")
    images, labels = example_batch(spec, batch_size=8, image_size=8, seed=5)
    torch.manual_seed(0)
    model = build_model("autoencoder-sparse", image_size=8)
    expected = _plain_sgd(
        copy.deepcopy(model), lambda m: m.dp_loss(images, labels), epochs=1, lr=0.1
    )
    result = train_dp(
        model, TensorDataset(images, labels), epochs=1, batch_size=8, learning_rate=0.1,
        noise_multiplier=0.0, max_grad_norm=1.0, delta=DELTA, seed=0, private=False,
    )
    _assert_state_close(result.state_dict, expected)


@pytest.mark.parametrize("mode", ["ew", "functorch"])
def test_empty_poisson_batches_take_a_noise_only_step(mode: str) -> None:
    # Prepare: 2 records, expected batch 1 -> sample rate 1/2, so over 40 steps about 10
    # batches are empty (P = 1/4 each); these modes cannot run a forward pass on them.
    data = TensorDataset(torch.randn(2, 1, 16, 16), torch.tensor([0, 1]))
    # Execute
    result = train_dp(
        build_model("cnn", image_size=16), data, epochs=20, batch_size=1, learning_rate=0.01,
        noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA, seed=0, grad_sample_mode=mode,
    )
    # Assert: every step, empty or not, was taken and accounted.
    assert result.steps == 40 and result.accountant_state.total_steps == 40
    assert all(torch.isfinite(v).all() for v in result.state_dict.values())


def test_ew_matches_hooks_without_noise() -> None:
    # The registered mode of a model must not change what is learned: with no noise and a
    # full batch, "ew" and "hooks" give the same weights for the CNN.
    spec = get_spec("cnn")
    data = TensorDataset(*example_batch(spec, batch_size=16, image_size=16, seed=6))
    torch.manual_seed(0)
    model = build_model("cnn", image_size=16)
    kwargs: dict[str, Any] = dict(
        epochs=2, batch_size=16, learning_rate=0.1, noise_multiplier=0.0, max_grad_norm=0.5,
        delta=DELTA, seed=0,
    )
    hooks = train_dp(model, data, grad_sample_mode="hooks", **kwargs)
    ew = train_dp(model, data, grad_sample_mode="ew", **kwargs)
    _assert_state_close(ew.state_dict, hooks.state_dict)


def test_evaluate_refuses_a_segmentation_model() -> None:
    from client.training import evaluate

    images = torch.randn(4, 1, 6, 6)
    with pytest.raises(ConfigError, match="segmentation"):
        evaluate(_PixelClassifier(), images, torch.tensor([0, 1, 0, 1]), device="cpu")
