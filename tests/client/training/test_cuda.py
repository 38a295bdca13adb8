"""DP-SGD on a CUDA GPU: the "direct" engine, its optimiser and ``train_dp`` against the CPU.

Every test here needs a CUDA device and is skipped without one (CI has none); run this file on
a GPU node. The CPU results are the reference: the same per-sample gradients, the same clipped
steps and the same accounting must come out of the GPU.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import per_sample
from client.training.per_sample import DirectDPOptimizer, DirectPerSampleGradients
from client.training.trainer import select_device, train_dp
from common.models.registry import build_model
from tests.client.training.test_per_sample import _direct_samples

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none); run on a GPU node"
)

CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _full_float32() -> Iterator[None]:
    """No TF32: compare the GPU's float32 arithmetic with the CPU's, not TF32's 10-bit mantissa."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


MODELS = [("cnn", 2, 16), ("resnet", 2, 16), ("densenet", 2, 16), ("cnn3d", 3, 8)]


def _samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """The engine's per-sample gradients (of a copy of ``model``), on the CPU."""
    samples = _direct_samples(model, x, y)
    assert all(getattr(t._base, "_direct_engine_buffer", False) for t in samples.values())
    return {name: t.detach().cpu() for name, t in samples.items()}


def test_select_device_picks_the_gpu() -> None:
    assert select_device().type == "cuda" and select_device("cuda:0") == torch.device("cuda:0")


@pytest.mark.parametrize(("name", "dims", "side"), MODELS, ids=[m[0] for m in MODELS])
def test_direct_per_sample_gradients_on_the_gpu_equal_the_cpu(name: str, dims: int, side: int) -> None:
    torch.manual_seed(1)
    model = build_model(name, in_channels=1, num_classes=2, image_size=side, spatial_dims=dims)
    x = torch.randn(7, 1, *([side] * dims))
    y = torch.randint(0, 2, (7,))
    cpu = _samples(model, x, y)
    gpu = _samples(copy.deepcopy(model).to(CUDA), x.to(CUDA), y.to(CUDA))
    assert cpu.keys() == gpu.keys()
    for key, value in cpu.items():  # float32 rounding through up to 37 layers: ~1e-4
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(gpu[key], value, rtol=1e-3, atol=1e-4 * scale,
                                   msg=lambda text, key=key: f"{key}: {text}")


def test_padded_batches_on_the_gpu_give_the_real_rows_and_zero_padding() -> None:
    from client.training.trainer import _ModelLoss

    torch.manual_seed(8)
    model = build_model("densenet", in_channels=1, num_classes=2, image_size=16)
    x, y = torch.randn(5, 1, 16, 16), torch.randint(0, 2, (5,))
    cpu = _samples(model, x, y)
    for trim in (False, True):
        net = copy.deepcopy(model).to(CUDA)
        engine = DirectPerSampleGradients(net, loss_reduction="sum")
        batch_loss = _ModelLoss(net, nn.CrossEntropyLoss(), pad_multiple=4, reduction="sum")
        try:
            loss, _ = batch_loss(x.to(CUDA), y.to(CUDA))
            loss.backward()
        finally:
            engine.restore(rows=5 if trim else None)
            engine.close()
        for key, p in net.named_parameters():
            assert p.grad_sample.shape[0] == (5 if trim else 8), key
            # other batch shapes, other cuDNN kernels: one GroupNorm entry of 120 was off by
            # 1.4e-4 (scale 0.8) on an H200; a padding bug would be off by tens of percent
            scale = float(cpu[key].abs().max()) or 1.0
            torch.testing.assert_close(p.grad_sample[:5].cpu(), cpu[key], rtol=1e-3, atol=5e-4 * scale,
                                       msg=lambda text, key=key: f"{key}: {text}")
            if not trim:
                assert bool((p.grad_sample[5:] == 0).all()), key


def test_one_draw_noise_on_the_gpu_is_gaussian_with_the_right_sd() -> None:
    sigma, clip, batch = 1.1, 0.5, 3
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.Flatten(), nn.Linear(8 * 36, 4)).to(CUDA)
    params = list(model.parameters())
    engine = DirectPerSampleGradients(model)
    nn.functional.cross_entropy(model(torch.randn(5, 1, 8, 8, device=CUDA)),
                                torch.randint(0, 4, (5,), device=CUDA)).backward()
    engine.restore()
    buffer = per_sample._shared_buffer(params)
    assert buffer is not None and buffer.is_cuda
    buffer.zero_()  # the gradient is then the noise alone
    opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=sigma, max_grad_norm=clip,
                            expected_batch_size=batch,
                            generator=torch.Generator(device=CUDA).manual_seed(3))
    opt.pre_step()
    engine.close()
    noise = torch.cat([p.grad.reshape(-1) for p in params]).cpu() * batch / (sigma * clip)
    assert noise.numel() == 1252 and bool((noise != 0).all())
    # 1,252 standard normal draws: sd of the sd estimate ~2 %, of the mean ~2.8 %
    assert abs(float(noise.std()) - 1) < 0.08 and abs(float(noise.mean())) < 0.12


@pytest.mark.parametrize("name", ["cnn", "densenet"])
def test_train_dp_on_the_gpu_follows_the_cpu_run(name: str) -> None:
    """Same seed, no noise: the same Poisson batches and steps; weights within rounding."""
    torch.manual_seed(4)
    model = build_model(name, in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(40, 1, 16, 16), torch.randint(0, 2, (40,)))
    kwargs = dict(epochs=1, batch_size=8, learning_rate=0.05, noise_multiplier=0.0,
                  max_grad_norm=1.0, delta=1e-5, seed=6, grad_sample_mode="direct")
    cpu = train_dp(model, data, device="cpu", **kwargs)  # type: ignore[arg-type]
    gpu = train_dp(model, data, device="cuda", **kwargs)  # type: ignore[arg-type]
    assert gpu.steps == cpu.steps and gpu.accountant_state == cpu.accountant_state
    assert gpu.train_loss == pytest.approx(cpu.train_loss, rel=1e-3)
    for key, value in cpu.state_dict.items():
        assert gpu.state_dict[key].device.type == "cpu", key  # released weights come back on CPU
        torch.testing.assert_close(gpu.state_dict[key], value, rtol=0, atol=1e-3,
                                   msg=lambda text, key=key: f"{key}: {text}")


def test_train_dp_on_the_gpu_with_noise_accounts_like_the_cpu() -> None:
    torch.manual_seed(5)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(30, 1, 16, 16), torch.randint(0, 2, (30,)))
    kwargs = dict(epochs=2, batch_size=6, learning_rate=0.05, noise_multiplier=1.0,
                  max_grad_norm=1.0, delta=1e-5, seed=7)
    cpu = train_dp(model, data, device="cpu", **kwargs)  # type: ignore[arg-type]
    gpu = train_dp(model, data, device="cuda", **kwargs)  # type: ignore[arg-type]
    assert math.isfinite(gpu.epsilon) and gpu.epsilon == cpu.epsilon
    assert gpu.accountant_state == cpu.accountant_state
    moved = max(float((gpu.state_dict[k] - model.state_dict()[k]).abs().max()) for k in cpu.state_dict)
    assert moved > 0  # it trained
