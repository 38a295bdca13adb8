"""Family-specific properties of the standard model families (beyond the contract suite)."""

from __future__ import annotations

import pytest
import torch
from opacus.layers import DPGRU, DPLSTM
from torch import nn

from common.errors import ConfigError
from common.models import build_model, count_parameters, get_spec
from common.models.autoencoder import DeepAutoencoder
from common.models.testing import example_batch


def test_cnn_keeps_its_weight_layout() -> None:
    model = build_model("cnn", image_size=28)
    assert count_parameters(model) == 14_274
    assert list(model.state_dict())[:2] == ["features.0.0.weight", "features.0.0.bias"]


@pytest.mark.parametrize(
    ("name", "size"),
    [("cnn3d", 28), ("mlp", 28), ("lstm", 28), ("gru", 16), ("resnet", 16), ("densenet", 16),
     ("dsn", 16), ("autoencoder", 16)],
)
def test_volume_models_map_volumes_to_logits(name: str, size: int) -> None:
    model = build_model(name, image_size=size, spatial_dims=3, num_classes=3)
    out = model(torch.randn(2, 1, size, size, size))
    assert out.shape == (2, 3) and torch.isfinite(out).all()


def test_cnn3d_rejects_2d() -> None:
    with pytest.raises(ConfigError, match="spatial_dims"):
        build_model("cnn3d", image_size=28, spatial_dims=2)


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_monai_nets_have_no_batchnorm_and_no_inplace_activation(name: str) -> None:
    model = build_model(name, image_size=28)
    kinds = {type(m) for m in model.modules()}
    assert not any(issubclass(k, nn.modules.batchnorm._BatchNorm) for k in kinds)
    assert nn.GroupNorm in kinds
    assert all(not getattr(m, "inplace", False) for m in model.modules())


def test_resnet_residual_is_out_of_place_so_hooks_see_it() -> None:
    # An in-place "out += residual" raises in autograd under Opacus hooks; a backward pass
    # through a GradSampleModule with per-sample gradients on every parameter proves it is not.
    from opacus import GradSampleModule

    model = GradSampleModule(build_model("resnet", image_size=16))
    model(torch.randn(3, 1, 16, 16)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 3, name


@pytest.mark.parametrize(("name", "layer"), [("lstm", DPLSTM), ("gru", DPGRU)])
def test_rnns_use_opacus_dp_layers_over_rows(name: str, layer: type) -> None:
    model = build_model(name, image_size=16)
    assert isinstance(model.rnn, layer)
    # Reading rows in order: reversing the rows changes the output (the model is not a
    # bag of rows), while a batch of identical images gives identical outputs.
    x = torch.randn(1, 1, 16, 16)
    assert not torch.allclose(model(x), model(x.flip(2)))
    twice = model(torch.cat([x, x]))
    torch.testing.assert_close(twice[0], twice[1])


def test_rnn_refuses_huge_steps() -> None:
    with pytest.raises(ConfigError, match="per step"):
        build_model("lstm", image_size=64, spatial_dims=3)


def test_dsn_modules_see_the_raw_input_and_the_previous_output() -> None:
    model = build_model("dsn", image_size=8, num_classes=2)
    first, second, third = model.stack
    assert first[0].in_features == 64 and second[0].in_features == third[0].in_features == 66
    x = torch.randn(4, 1, 8, 8)
    before = model(x)
    with torch.no_grad():
        first[2].bias.add_(1.0)  # changes only module 1's output, which later modules read
    assert not torch.allclose(model(x), before)


def test_autoencoder_embeds_and_reconstructs() -> None:
    model = build_model("autoencoder", image_size=16)
    x = torch.randn(5, 1, 16, 16)
    assert model.embed(x).shape == (5, 32)
    assert model.reconstruct(x).shape == x.shape
    torch.testing.assert_close(model(x), model.head(model.embed(x)))


def test_sparse_variant_adds_a_penalty_and_denoising_corrupts_only_in_training() -> None:
    spec = get_spec("autoencoder")
    x, y = example_batch(spec, batch_size=8, image_size=8)
    torch.manual_seed(0)
    plain = build_model("autoencoder", image_size=8)
    sparse = build_model("autoencoder-sparse", image_size=8)
    denoising = build_model("autoencoder-denoising", image_size=8)
    sparse.load_state_dict(plain.state_dict())
    denoising.load_state_dict(plain.state_dict())
    code = plain.embed(x)
    assert float(sparse.dp_loss(x, y) - plain.dp_loss(x, y)) == pytest.approx(
        0.05 * float(code.abs().mean()), rel=1e-4
    )
    denoising.eval()
    torch.testing.assert_close(denoising.dp_loss(x, y), plain.dp_loss(x, y))
    denoising.train()
    assert not torch.allclose(denoising.dp_loss(x, y), plain.dp_loss(x, y))


def test_unsupervised_autoencoder_ignores_targets_and_freezes_its_head() -> None:
    model = DeepAutoencoder((1, 8, 8), 2, label_weight=0.0)
    x = torch.randn(6, 1, 8, 8)
    a = model.dp_loss(x, torch.zeros(6, dtype=torch.long))
    b = model.dp_loss(x, torch.ones(6, dtype=torch.long))
    torch.testing.assert_close(a, b)
    assert not any(p.requires_grad for p in model.head.parameters())


def test_autoencoder_dp_loss_is_a_mean_of_per_sample_terms() -> None:
    # Per-sample clipping is only valid if each sample's term depends on that sample only:
    # the loss of a batch equals the mean of the single-sample losses.
    spec = get_spec("autoencoder-sparse")
    x, y = example_batch(spec, batch_size=6, image_size=8)
    model = build_model("autoencoder-sparse", image_size=8)
    singles = torch.stack([model.dp_loss(x[i : i + 1], y[i : i + 1]) for i in range(6)])
    torch.testing.assert_close(model.dp_loss(x, y), singles.mean())


@pytest.mark.parametrize("name", ["cnn", "cnn3d", "unet", "lstm"])
def test_example_batch_shapes_and_learnable_signal(name: str) -> None:
    spec = get_spec(name)
    dims = 2 if 2 in spec.spatial_dims else 3
    x, y = example_batch(spec, batch_size=64, image_size=16, num_classes=3, seed=1)
    assert x.shape == (64, 1) + (16,) * dims and x.dtype == torch.float32
    if "classification" in spec.tasks:
        assert y.shape == (64,) and set(y.tolist()) <= {0, 1, 2}
        # class 1 is brighter than class 0 in its band: a learnable signal
        assert float(x[y == 1].mean()) > float(x[y == 0].mean()) + 0.1
    else:
        assert y.shape == (64,) + (16,) * dims and y.dtype == torch.long
        assert set(y.unique().tolist()) <= {0, 1, 2} and (y > 0).any()
        assert float(x[:, 0][y > 0].mean()) > float(x[:, 0][y == 0].mean()) + 1.0
    again = example_batch(spec, batch_size=64, image_size=16, num_classes=3, seed=1)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)


def test_example_batch_refuses_an_unsupported_dimensionality() -> None:
    with pytest.raises(ConfigError):
        example_batch(get_spec("cnn"), spatial_dims=3)


def test_pretrained_encoder_linear_probe_trains_only_the_head() -> None:
    # Prepare: unsupervised DP pretraining of an autoencoder, then a DP linear probe on its
    # frozen encoder.
    from client.training import train_dp
    from torch.utils.data import TensorDataset

    from common.models.autoencoder import EncoderClassifier

    spec = get_spec("autoencoder")
    x, y = example_batch(spec, batch_size=48, image_size=8, seed=11)
    torch.manual_seed(0)
    auto = DeepAutoencoder((1, 8, 8), 2, label_weight=0.0)
    pretrained = train_dp(
        auto, TensorDataset(x, torch.zeros_like(y)), epochs=3, batch_size=16,
        learning_rate=0.1, noise_multiplier=0.5, max_grad_norm=1.0, delta=1e-5, seed=0,
    )
    auto.load_state_dict(pretrained.state_dict)
    probe = EncoderClassifier(auto, num_classes=2)
    encoder_before = {k: v.clone() for k, v in probe.encoder.state_dict().items()}
    # Execute
    ce_before = float(torch.nn.functional.cross_entropy(probe(x), y))
    result = train_dp(
        probe, TensorDataset(x, y), epochs=5, batch_size=16, learning_rate=0.5,
        noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, seed=0,
    )
    # Assert: the encoder is the pretrained one and unchanged, the head learned.
    for key, value in encoder_before.items():
        torch.testing.assert_close(result.state_dict[f"encoder.{key}"], value)
        torch.testing.assert_close(value, auto.encoder.state_dict()[key])
    torch.testing.assert_close(probe.encoder(x), auto.embed(x))
    probe.load_state_dict(result.state_dict)
    assert float(torch.nn.functional.cross_entropy(probe(x), y)) < ce_before
