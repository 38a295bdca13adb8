"""The "direct" per-sample gradient engine against Opacus's own per-sample gradients.

Reference: Opacus's ``GradSampleModule`` (hooks mode) on a copy of the same module with the
same batch; the engine's ``p.grad_sample`` must equal Opacus's for every parameter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from opacus.grad_sample import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import TensorDataset

from client.training import per_sample
from client.training import trainer as trainer_module
from client.training.per_sample import (
    DirectDPOptimizer,
    DirectPerSampleGradients,
    conv_grad_sample_grouped,
    conv_grad_sample_loop,
    conv_grad_sample_unfold,
    make_private_direct,
    unsupported_layers,
)
from client.training.trainer import train_dp
from common.errors import ConfigError
from common.models.registry import build_model, get_spec, list_models


def _opacus_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    ref = GradSampleModule(copy.deepcopy(model))
    nn.functional.cross_entropy(ref(x), y).backward()
    return {name: p.grad_sample for name, p in ref._module.named_parameters()
            if p.requires_grad and getattr(p, "grad_sample", None) is not None}  # used ones


def _direct_samples(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(model)
    before = [p.requires_grad for p in net.parameters()]
    engine = DirectPerSampleGradients(net)
    try:
        nn.functional.cross_entropy(net(x), y).backward()
    finally:
        engine.restore()
        engine.close()
    after = [p.requires_grad for p in net.parameters()]
    assert after == before, "parameters not given back to autograd"
    return {name: p.grad_sample for name, p in net.named_parameters()
            if p.requires_grad and getattr(p, "grad_sample", None) is not None}


def _assert_same(ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    assert ours.keys() == ref.keys()
    for name, gs in ref.items():
        assert ours[name].shape == gs.shape, name
        torch.testing.assert_close(ours[name], gs, rtol=1e-4, atol=1e-5, msg=name)


def _head(channels: int, positions: int) -> list[nn.Module]:
    return [nn.Flatten(), nn.Linear(channels * positions, 3)]


CONV2D_CASES = [
    dict(in_channels=3, out_channels=5, kernel_size=3, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
    dict(in_channels=4, out_channels=6, kernel_size=1, stride=2, bias=False),
    dict(in_channels=2, out_channels=4, kernel_size=3, dilation=2, padding=2),
    dict(in_channels=4, out_channels=6, kernel_size=3, groups=2, padding=1),
    dict(in_channels=3, out_channels=4, kernel_size=(3, 5), padding="same"),
    dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid"),
]


@pytest.mark.parametrize("kwargs", CONV2D_CASES, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_conv2d_per_sample_gradients_equal_opacus(kwargs: dict[str, object]) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(**kwargs)  # type: ignore[arg-type]
    x = torch.randn(6, conv.in_channels, 9, 9)
    out = conv(x)
    model = nn.Sequential(conv, nn.ReLU(), *_head(out.shape[1], out.shape[2] * out.shape[3]))
    y = torch.randint(0, 3, (6,))
    ref = _opacus_samples(model, x, y)
    _assert_same(_direct_samples(model, x, y), ref)
    # every conv method, whichever the autotuner picked
    g = torch.randn_like(out)
    a = conv_grad_sample_grouped(conv, x, g)
    for method in (conv_grad_sample_unfold, conv_grad_sample_loop):
        b = method(conv, x, g)
        for p in a:
            torch.testing.assert_close(a[p], b[p], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dims", [1, 3])
def test_conv1d_and_conv3d_equal_opacus(dims: int) -> None:
    torch.manual_seed(1)
    conv_t = {1: nn.Conv1d, 3: nn.Conv3d}[dims]
    conv = conv_t(2, 3, kernel_size=3, stride=2, padding=1)
    x = torch.randn(4, 2, *([7] * dims))
    out = conv(x)
    model = nn.Sequential(conv, nn.Tanh(), *_head(3, out[0, 0].numel()))
    y = torch.randint(0, 3, (4,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))
    g = torch.randn_like(out)
    a = conv_grad_sample_grouped(conv, x, g)
    for method in (conv_grad_sample_unfold, conv_grad_sample_loop):
        b = method(conv, x, g)
        for p in a:
            torch.testing.assert_close(a[p], b[p], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("dims", "groups", "side"), [(1, 1, 5), (2, 1, 5), (2, 2, 1), (2, 1, 1), (3, 2, 3)],
)
def test_pointwise_convolutions_equal_a_per_sample_loop(dims: int, groups: int, side: int) -> None:
    # 1x1 kernels skip the unfolding, and a single position is an outer product
    torch.manual_seed(3)
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](4, 6, kernel_size=1, groups=groups)
    x = torch.randn(5, 4, *([side] * dims))
    g = torch.randn_like(conv(x))
    expected = {
        p: torch.stack([
            torch.autograd.grad((conv(x[i:i + 1]) * g[i:i + 1]).sum(), p)[0] for i in range(5)
        ])
        for p in (conv.weight, conv.bias)
    }
    for method in (conv_grad_sample_unfold, conv_grad_sample_grouped, conv_grad_sample_loop):
        got = method(conv, x, g)
        for p, want in expected.items():
            torch.testing.assert_close(got[p], want, rtol=1e-5, atol=1e-6)


def test_linear_groupnorm_and_sequence_input_equal_opacus() -> None:
    torch.manual_seed(2)

    class SeqNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(5, 8)  # applied to [B, T, 5]
            self.norm = nn.GroupNorm(2, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.proj(x).transpose(1, 2)  # [B, 8, T]
            return self.out(self.norm(h).mean(-1))

    model = SeqNet()
    x = torch.randn(7, 4, 5)
    y = torch.randint(0, 3, (7,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))


def test_an_in_place_activation_after_the_first_layer_equals_opacus() -> None:
    # The first layer's output is tapped by the engine; an in-place ReLU may modify it.
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(5, 1, 6, 6)
    y = torch.randint(0, 3, (5,))
    reference = copy.deepcopy(model)
    reference[1].inplace = False  # Opacus's own hooks refuse an in-place op after a layer
    _assert_same(_direct_samples(model, x, y), _opacus_samples(reference, x, y))


def test_a_module_using_a_linear_layers_weight_itself_is_refused() -> None:
    # Only Opacus's renamed recurrent parameters count as aliases of a supported layer's:
    # another module computing with a Linear's weight would get no per-sample gradient.
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.weight = self.lin.weight

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return nn.functional.linear(self.lin(x), self.weight)

    assert unsupported_layers(Tied()) == ["<root>: Tied"]


def test_tied_layer_sums_its_uses_like_opacus() -> None:
    torch.manual_seed(3)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.tanh(self.layer(torch.tanh(self.layer(x)))))

    model, x, y = Tied(), torch.randn(5, 4), torch.randint(0, 2, (5,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))


def test_tied_layer_used_on_hidden_then_on_data_keeps_both_uses() -> None:
    torch.manual_seed(10)

    class Reverse(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.pre = nn.Linear(4, 4)
            self.shared = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first = self.shared(torch.tanh(self.pre(x)))  # input requires grad: frozen
            second = self.shared(x)  # then on the data itself
            return self.head(torch.tanh(first + second))

    model, x, y = Reverse(), torch.randn(6, 4), torch.randint(0, 2, (6,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),  # 10 px: stride does not divide evenly
        nn.Conv1d(3, 6, 3, dilation=2, padding="same", groups=3),
        nn.Conv3d(3, 4, 2, stride=(1, 2, 2), bias=False),
    ],
    ids=["conv2d-uneven-stride", "conv1d-groups-dilation-same", "conv3d-anisotropic-stride"],
)
def test_conv_after_another_layer_equals_opacus(conv: nn.Module) -> None:
    torch.manual_seed(11)
    dims = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}[type(conv)]
    pre = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](2, 3, 1)
    x = torch.randn(5, 2, *([10] * dims))
    out = conv(pre(x))
    model = nn.Sequential(pre, nn.Tanh(), conv, nn.Tanh(), *_head(out.shape[1], out[0, 0].numel()))
    y = torch.randint(0, 3, (5,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))


def test_two_backward_passes_without_a_step_are_refused() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    engine = DirectPerSampleGradients(model)
    x, y = torch.randn(4, 3), torch.randint(0, 2, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    engine.restore()
    with pytest.raises(RuntimeError, match="earlier backward pass"):
        nn.functional.cross_entropy(model(x), y).backward()
    engine.close()


@pytest.mark.parametrize("ghost", [False, True])  # hooks' own check; autograd's for ghost layers
def test_in_place_change_of_a_saved_input_is_detected(ghost: bool) -> None:
    class InPlace(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.a(x) * 1.0
            out = self.b(h)
            h.mul_(2.0)  # b's saved input changes after b ran
            return out

    model = InPlace()
    engine = DirectPerSampleGradients(model, ghost_linear=ghost)
    with pytest.raises(RuntimeError, match="modified in place|modified by an inplace operation"):
        nn.functional.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,))).backward()
    engine.close()


def test_direct_optimizer_refuses_to_clip_the_same_samples_twice() -> None:
    params = [nn.Parameter(torch.zeros(3))]
    opt = _opacus_optimizer(params, DirectDPOptimizer)
    params[0].grad_sample = torch.randn(4, 3)
    opt.pre_step()
    with pytest.raises(ValueError):
        opt.pre_step()


DIRECT_MODELS = [s.name for s in list_models() if s.grad_sample_mode == "direct"]


@pytest.mark.parametrize("name", DIRECT_MODELS)
def test_registered_direct_models_equal_opacus(name: str) -> None:
    torch.manual_seed(4)
    dims = 2 if 2 in get_spec(name).spatial_dims else 3
    side = 28 if dims == 2 else 16
    model = build_model(name, in_channels=1, num_classes=2, image_size=side, spatial_dims=dims)
    x, y = torch.randn(5, 1, *([side] * dims)), torch.randint(0, 2, (5,))
    _assert_same(_direct_samples(model, x, y), _opacus_samples(model, x, y))


def test_the_cnn_family_is_registered_for_direct_mode() -> None:
    assert {"cnn", "resnet", "densenet", "cnn3d"} <= set(DIRECT_MODELS)


def test_frozen_parameters_are_left_alone() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 2))
    model[0].weight.requires_grad_(False)
    x, y = torch.randn(3, 1, 8, 8), torch.randint(0, 2, (3,))
    ours = _direct_samples(model, x, y)
    assert "0.weight" not in ours and "0.bias" in ours
    _assert_same(ours, _opacus_samples(model, x, y))
    assert model[0].weight.requires_grad is False


def test_parameters_come_back_to_autograd_after_an_error() -> None:
    class Fails(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.b(self.a(x))
            raise RuntimeError("boom")

    model = Fails()
    engine = DirectPerSampleGradients(model)
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 3))
    assert model.b.weight.requires_grad is False  # taken out during the forward pass
    engine.close()
    assert all(p.requires_grad for p in model.parameters())
    # the hooks are gone: a plain forward/backward now fills .grad, not .grad_sample
    model.b(model.a(torch.randn(2, 3))).sum().backward()
    assert model.b.weight.grad is not None and getattr(model.b.weight, "grad_sample", None) is None


@pytest.mark.parametrize(
    ("layer", "expected"),
    [
        (nn.LSTM(3, 3), "LSTM"),
        (nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), "non-zero or asymmetric padding"),
        (nn.Conv2d(1, 2, 4, padding="same"), "non-zero or asymmetric padding"),
        (nn.LayerNorm(3), "LayerNorm"),
    ],
)
def test_unsupported_layers_are_refused_by_name(layer: nn.Module, expected: str) -> None:
    model = nn.Sequential(layer)
    with pytest.raises(ConfigError, match=expected) as info:
        DirectPerSampleGradients(model)
    assert "0:" in str(info.value) and "hooks" in str(info.value)


def test_batchnorm_is_refused_before_training() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, affine=False), nn.Flatten(), nn.Linear(2 * 36, 2))
    data = TensorDataset(torch.randn(12, 1, 8, 8), torch.randint(0, 2, (12,)))
    with pytest.raises(ConfigError, match="BatchNorm2d .mixes samples"):
        train_dp(model, data, epochs=1, batch_size=4, learning_rate=0.1, noise_multiplier=1.0,
                 max_grad_norm=1.0, delta=1e-5, grad_sample_mode="direct", seed=0)


def test_conv_method_is_chosen_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    x, g = torch.randn(4, 2, 11, 13), torch.randn(4, 3, 11, 13)
    reference = conv_grad_sample_unfold(conv, x, g)
    first = per_sample.conv_grad_sample(conv, x, g)  # times every method
    chosen = [v for k, v in per_sample._CONV_METHOD.items() if k[3] == tuple(x.shape[1:])]
    assert chosen and chosen[0] in ("grouped", "unfold", "loop")
    timed: list[float] = []
    monkeypatch.setattr(per_sample.time, "perf_counter", lambda: timed.append(0.0) or 0.0)
    second = per_sample.conv_grad_sample(conv, x, g)  # cached: no timing
    assert timed == []
    per_sample.conv_grad_sample(conv, x[:3], g[:3])  # another batch size: still cached
    assert timed == []
    for p in reference:
        torch.testing.assert_close(first[p], reference[p], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(second[p], reference[p], rtol=1e-4, atol=1e-5)


def _opacus_optimizer(params: list[nn.Parameter], cls: type[DPOptimizer]) -> DPOptimizer:
    return cls(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0, max_grad_norm=0.7,
               expected_batch_size=4)


@pytest.mark.parametrize("n", [5, 0])
def test_direct_optimizer_clips_and_scales_like_opacus(n: int) -> None:
    torch.manual_seed(7)
    shapes = [(3, 4), (3,), (2, 2, 3)]
    grads = [torch.randn(n, *s) * 3 for s in shapes]
    results = []
    for cls in (DPOptimizer, DirectDPOptimizer):
        params = [nn.Parameter(torch.zeros(s)) for s in shapes]
        opt = _opacus_optimizer(params, cls)
        for p, g in zip(params, grads, strict=True):
            p.grad_sample = g.clone()
        opt.pre_step()
        results.append([p.grad.clone() for p in params])
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)
    if n:
        clipped_norm = math.sqrt(sum(float(g.pow(2).sum()) for g in results[1]))
        assert clipped_norm <= 0.7 * n / 4 + 1e-5  # each sample contributes at most C / batch


def _engine_backward(n: int, seed: int = 9) -> nn.Module:
    """A conv / GroupNorm / tied-Linear model after one engine backward pass on ``n`` samples."""
    torch.manual_seed(seed)
    tied = nn.Linear(6, 6)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 6), tied, nn.Tanh(), tied, nn.Linear(6, 3),
    )
    engine = DirectPerSampleGradients(model)
    try:
        nn.functional.cross_entropy(model(torch.randn(n, 1, 6, 6) * 4), torch.randint(0, 3, (n,))).backward()
    finally:
        engine.restore()
        engine.close()
    return model


@pytest.mark.parametrize("n", [6, 1])
def test_direct_optimizer_clips_the_engine_buffer_like_opacus(n: int) -> None:
    model = _engine_backward(n)
    params = list(model.parameters())
    buffer = per_sample._shared_buffer(params)
    assert buffer is not None and buffer.shape == (n, sum(p.numel() for p in params))
    reference = copy.deepcopy(model)
    for ours, ref in zip(params, reference.parameters(), strict=True):
        ref.grad_sample = ours.grad_sample.clone()  # a plain tensor: Opacus's own path
    results = []
    for cls, ps in ((DPOptimizer, list(reference.parameters())), (DirectDPOptimizer, params)):
        opt = _opacus_optimizer(ps, cls)
        opt.pre_step()
        results.append([p.grad.clone() for p in ps])
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)
    norms = buffer.norm(dim=1)
    assert bool((norms > 0.7).any())  # some samples were clipped, so the factors mattered
    with pytest.raises(ValueError):  # and the same samples cannot be clipped twice
        opt.pre_step()


def test_direct_optimizer_over_part_of_the_model_uses_opacus_path() -> None:
    model = _engine_backward(5)
    head = list(model[-1].parameters())  # an optimiser over the last layer only
    assert per_sample._shared_buffer(head) is None
    reference = [nn.Parameter(p.detach().clone()) for p in head]
    for ours, ref in zip(head, reference, strict=True):
        ref.grad_sample = ours.grad_sample.clone()
    results = []
    for cls, ps in ((DPOptimizer, reference), (DirectDPOptimizer, head)):
        opt = _opacus_optimizer(ps, cls)
        opt.pre_step()
        results.append([p.grad.clone() for p in ps])
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_train_dp_direct_equals_opacus_modes_without_noise() -> None:
    """Same seed, no noise: same Poisson batches, same clipped steps, same weights.

    Each step's clipped gradient agrees with Opacus's to float rounding (checked above);
    the engine clips with one norm over all parameters where Opacus stacks per-parameter
    norms, and hooks mode has its own rounding too: 12 momentum steps through ReLUs grow
    these ~1e-8 differences to 2.3e-4 for "ew" with one torch thread (measured; 1e-7 with
    two), 3.8e-4 for "hooks".
    """
    torch.manual_seed(8)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(48, 1, 16, 16), torch.randint(0, 2, (48,)))
    kwargs = dict(epochs=2, batch_size=8, learning_rate=0.1, noise_multiplier=0.0,
                  max_grad_norm=0.5, delta=1e-5, seed=11)
    direct = train_dp(model, data, grad_sample_mode="direct", **kwargs)  # type: ignore[arg-type]
    for mode, atol in (("ew", 1e-3), ("hooks", 1e-3)):
        ref = train_dp(model, data, grad_sample_mode=mode, **kwargs)  # type: ignore[arg-type]
        assert direct.steps == ref.steps and direct.sample_rate == ref.sample_rate
        assert direct.accountant_state == ref.accountant_state
        for name, value in ref.state_dict.items():
            torch.testing.assert_close(direct.state_dict[name], value, rtol=0, atol=atol,
                                       msg=f"{mode}: {name}")


def test_train_dp_direct_accounts_every_step_including_empty_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(9)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(3, 1, 16, 16), torch.randint(0, 2, (3,)))
    calls: list[int] = []
    real = trainer_module._noise_only_step

    def counting(optimizer: torch.optim.Optimizer) -> None:
        calls.append(1)
        real(optimizer)

    monkeypatch.setattr(trainer_module, "_noise_only_step", counting)
    kwargs = dict(epochs=8, batch_size=1, learning_rate=0.1, noise_multiplier=1.0,
                  max_grad_norm=1.0, delta=1e-5, seed=3)
    result = train_dp(model, data, grad_sample_mode="direct", **kwargs)  # type: ignore[arg-type]
    # sample rate 1/3: each step is empty with probability 8/27; with this seed some are
    assert calls, "no empty Poisson batch was drawn; pick another seed"
    assert result.steps == 24 and result.accountant_state.total_steps == 24
    ref = train_dp(model, data, grad_sample_mode="ew", **kwargs)  # type: ignore[arg-type]
    assert result.accountant_state == ref.accountant_state and result.epsilon == ref.epsilon
    assert math.isfinite(result.epsilon)
    # the noise is drawn as one vector (test_direct_optimizer_noise_...): with the same seed,
    # a different order of the generator than Opacus's, so the weights are not compared here
    again = train_dp(model, data, grad_sample_mode="direct", **kwargs)  # type: ignore[arg-type]
    for name, value in result.state_dict.items():  # but the same seed repeats the run
        torch.testing.assert_close(again.state_dict[name], value, rtol=0, atol=0, msg=name)
    # and the noise reaches the weights: each step adds N(0, (sigma C / B)^2) per coordinate,
    # times lr, so 24 steps (with momentum) move every weight by ~lr * sigma C / B * sqrt(24)
    quiet = train_dp(model, data, grad_sample_mode="direct",  # type: ignore[arg-type]
                     **(kwargs | {"noise_multiplier": 0.0}))
    moved = torch.cat([(result.state_dict[k] - quiet.state_dict[k]).reshape(-1)
                       for k in result.state_dict if result.state_dict[k].is_floating_point()])
    assert float(moved.std()) > 0.1 * 0.1 * 1.0 / 1 * math.sqrt(24) / 3


def test_direct_optimizer_noise_is_exactly_one_draw_per_coordinate() -> None:
    """p.grad = (clipped sum + N(0, (sigma C)^2) drawn once over all coordinates) / batch."""
    sigma, clip, batch = 1.3, 0.7, 4
    model = _engine_backward(6)
    params = list(model.parameters())
    buffer = per_sample._shared_buffer(params)
    assert buffer is not None
    factor = (clip / (buffer.norm(dim=1) + 1e-6)).clamp(max=1.0)
    generator = torch.Generator().manual_seed(5)
    replay = torch.Generator().manual_seed(5)
    expected = (factor @ buffer + torch.normal(0, sigma * clip, size=(buffer.shape[1],),
                                               generator=replay)) / batch
    opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=batch, generator=generator)
    columns = {id(p): p.grad_sample.storage_offset() - buffer.storage_offset() for p in params}
    opt.pre_step()
    covered = 0
    for p in params:
        start = columns[id(p)]
        torch.testing.assert_close(p.grad, expected[start:start + p.numel()].view_as(p),
                                   rtol=1e-5, atol=1e-6)
        covered += p.numel()
    assert covered == buffer.shape[1]


def test_direct_optimizer_skipped_steps_accumulate_like_opacus() -> None:
    """Opacus's virtual steps (skip, skip, step) on engine buffers: the clipped sums add up."""
    results = []
    for cls in (DPOptimizer, DirectDPOptimizer):
        model = _engine_backward(5, seed=20)
        params = list(model.parameters())
        engine = DirectPerSampleGradients(model)
        opt = _opacus_optimizer(params, cls)
        for step in range(3):
            if step:
                for p in params:
                    p.grad_sample = None  # what zero_grad does after a skipped step
                torch.manual_seed(step)
                x, y = torch.randn(5, 1, 6, 6) * 4, torch.randint(0, 3, (5,))
                nn.functional.cross_entropy(model(x), y).backward()
                engine.restore()
            if cls is DPOptimizer:  # Opacus's own path: plain tensors, not buffer views
                for p in params:
                    p.grad_sample = p.grad_sample.clone()
            opt.signal_skip_step(do_skip=step < 2)
            stepped = opt.pre_step()
            assert stepped == (step == 2)
        engine.close()
        results.append([p.grad.clone() for p in params])
    for ours, ref in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_engine_buffer_is_reused_and_rewritten_across_batch_sizes() -> None:
    """The storage outlives a pass; each pass's rows equal Opacus's for that pass's batch."""
    torch.manual_seed(21)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.GroupNorm(1, 3), nn.Flatten(),
                          nn.Linear(3 * 25, 2))
    reference = copy.deepcopy(model)  # before the engine's hooks are attached
    engine = DirectPerSampleGradients(model)
    pointers = []
    for n in (8, 5, 9, 14):  # 9 fits the headroom left by 8; 14 does not
        for p in model.parameters():
            p.grad_sample = None
        x, y = torch.randn(n, 1, 5, 5), torch.randint(0, 2, (n,))
        nn.functional.cross_entropy(model(x), y).backward()
        engine.restore()
        ours = {name: p.grad_sample.clone() for name, p in model.named_parameters()}
        pointers.append(per_sample._shared_buffer(list(model.parameters())).data_ptr())
        _assert_same(ours, _opacus_samples(reference, x, y))
    engine.close()
    assert pointers[0] == pointers[1] == pointers[2] != pointers[3]


def test_direct_optimizer_noise_is_gaussian_on_every_coordinate_once() -> None:
    """Zero clipped gradients, so ``p.grad`` is the noise alone, divided by the batch size."""
    from scipy import stats

    sigma, clip, batch = 1.3, 0.7, 4
    model = _engine_backward(6)
    params = list(model.parameters())
    generator = torch.Generator().manual_seed(5)
    opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=sigma,
                            max_grad_norm=clip, expected_batch_size=batch, generator=generator)
    engine = DirectPerSampleGradients(model)  # a fresh backward pass per step
    draws = []
    for step in range(40):
        if step:
            opt.zero_grad()
            x, y = torch.randn(6, 1, 6, 6), torch.randint(0, 3, (6,))
            nn.functional.cross_entropy(model(x), y).backward()
            engine.restore()
        buffer = per_sample._shared_buffer(params)
        assert buffer is not None
        buffer.zero_()
        opt.pre_step()
        grads = [p.grad for p in params]
        assert all(g._base is grads[0]._base for g in grads)  # the one-draw path ran
        draws.append(torch.cat([g.reshape(-1) for g in grads]) * batch)
    engine.close()
    noise = torch.stack(draws)  # [steps, coordinates]
    assert noise.shape[1] == sum(p.numel() for p in params)
    assert bool((noise != 0).all())  # every coordinate noised
    std = sigma * clip
    values = noise.reshape(-1) / std
    assert stats.kstest(values.numpy(), "norm").pvalue > 1e-3
    # standard errors for ~5,600 draws: of the sd ~1 %, of the mean ~1.3 % of sd
    assert abs(float(values.std()) - 1) < 0.03 and abs(float(values.mean())) < 0.06
    # fresh noise per coordinate and per step: no coordinate's or step's draws repeat another's
    assert noise.T.abs().unique(dim=0).shape[0] == noise.shape[1]
    assert noise.abs().unique(dim=0).shape[0] == noise.shape[0]
    assert float(torch.corrcoef(noise)[0, 1:].abs().max()) < 0.5  # ~140 coordinates: 6 sd


def test_make_private_direct_matches_make_private_settings() -> None:
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader

    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
    data = TensorDataset(torch.randn(50, 4), torch.randint(0, 2, (50,)))
    ref_engine, our_engine = PrivacyEngine(), PrivacyEngine()
    ref_model = copy.deepcopy(model)
    _, ref_opt, ref_loader = ref_engine.make_private(
        module=ref_model, optimizer=torch.optim.SGD(ref_model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.3, max_grad_norm=0.9,
        poisson_sampling=True)
    hooks, our_opt, our_loader = make_private_direct(
        our_engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(data, batch_size=8), noise_multiplier=1.3, max_grad_norm=0.9,
        noise_generator=None)
    hooks.close()
    assert our_loader.sample_rate == ref_loader.sample_rate
    assert len(our_loader) == len(ref_loader)
    assert our_opt.expected_batch_size == ref_opt.expected_batch_size
    assert (our_opt.noise_multiplier, our_opt.max_grad_norm) == (1.3, 0.9)
    assert our_opt.loss_reduction == ref_opt.loss_reduction == "mean"
    for model_, opt in ((ref_model, ref_opt), (model, our_opt)):
        for p in model_.parameters():
            p.grad_sample = torch.randn(6, *p.shape)
        opt.step()
    assert our_engine.accountant.history == ref_engine.accountant.history == [(1.3, 1 / 7, 1)]  # ceil(50 / 8) = 7 batches


class _TiedTwoShapes(nn.Module):
    """One Linear used on a sequence (samples scaled by n) and on a 2-D input (output scaled)."""

    def __init__(self) -> None:
        super().__init__()
        self.pre, self.tied, self.head = nn.Linear(3, 4), nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [n, 30, 3]
        a = self.tied(torch.tanh(self.pre(x)))
        return self.head(torch.tanh(self.tied(torch.tanh(a.mean(1)))))


class _SharedWeight(nn.Module):
    """Two Linears sharing a weight, each with its own bias."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.head = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.b.weight = self.a.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class _MixedDtype(nn.Module):
    """A float64 layer: it keeps its own tensors and the optimiser takes Opacus's path."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.a = nn.Linear(4, 6)
        self.b = nn.Linear(6, 6).double()
        self.c = None if last else nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.tanh(self.a(x)).double())
        return h[:, :3].float() if self.c is None else self.c(torch.tanh(h).float())


class _TiedConv(nn.Module):
    """One convolution used twice on a large map (mean loss: its samples are scaled by n)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.tied = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Linear(2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tied(torch.tanh(self.tied(torch.tanh(self.stem(x)))))
        return self.head(h.mean((2, 3)))


class _TiedGroupNorm(nn.Module):
    """One GroupNorm used twice."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(torch.tanh(self.norm(self.conv(x))) * 2)
        return self.head(h.mean((2, 3)))


class _MixedDtypeTied(nn.Module):
    """A float64 Linear (its own tensors, no buffer) used twice, the uses' outputs added: both
    backward hooks see autograd's one output gradient, which must not be changed in place."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6).double(), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.tanh(self.a(x)).double()
        return self.c(torch.tanh(self.b(u) + self.b(torch.tanh(u))).float())


IN_PLACE_CASES: dict[str, tuple[object, tuple[int, ...], bool]] = {
    # name: (model factory, per-sample input shape, whether the shared buffer is expected)
    "conv1d-groups-bias-groupnorm": (lambda: nn.Sequential(
        nn.Conv1d(3, 6, 3, groups=3), nn.Tanh(), nn.Conv1d(6, 4, 1), nn.GroupNorm(2, 4),
        nn.Flatten(), nn.Linear(40, 3)), (3, 12), True),
    "conv3d-groups-bias": (lambda: nn.Sequential(
        nn.Conv3d(2, 4, 2, groups=2), nn.Tanh(), nn.Conv3d(4, 4, 2, groups=2), nn.Flatten(),
        nn.Linear(32, 3)), (2, 4, 4, 4), True),
    "pointwise-on-a-large-map": (lambda: nn.Sequential(
        nn.Conv2d(1, 2, 1), nn.Tanh(), nn.Conv2d(2, 8, 3, padding=1), nn.GroupNorm(4, 8),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)), (1, 16, 16), True),
    "single-position": (lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Conv2d(4, 6, 1, groups=2), nn.Flatten(),
        nn.Linear(6, 3)), (2, 3, 3), True),
    "linear-on-a-long-sequence": (lambda: nn.Sequential(
        nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 4), nn.Flatten(), nn.Linear(160, 3)), (40, 5), True),
    "tied-2d-and-3d": (_TiedTwoShapes, (30, 3), True),
    "shared-weight-own-biases": (_SharedWeight, (5,), True),
    "float64-in-the-middle": (lambda: _MixedDtype(last=False), (4,), False),
    "float64-first-in-backward": (lambda: _MixedDtype(last=True), (4,), False),
    "tied-conv-on-a-large-map": (_TiedConv, (1, 12, 12), True),
    "tied-groupnorm": (_TiedGroupNorm, (1, 6, 6), True),
    "float64-tied-outputs-added": (_MixedDtypeTied, (4,), False),
}


def _per_sample_loop(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    grads: dict[str, list[torch.Tensor]] = {name: [] for name, _ in model.named_parameters()}
    for i in range(x.shape[0]):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            grads[name].append(p.grad.clone())
    return {name: torch.stack(g) for name, g in grads.items()}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("method", ["grouped", "unfold", "loop"])
@pytest.mark.parametrize("case", list(IN_PLACE_CASES))
def test_in_place_writes_equal_a_per_sample_loop_over_reused_buffers(
    case: str, method: str, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each pass's per-sample gradients, written in place into a reused (NaN-poisoned) buffer,
    equal a per-sample autograd loop; batch sizes shrink, grow and outgrow the buffer; for a
    batch-mean loss (the engine scales) and a summed one (it does not)."""
    monkeypatch.setattr(per_sample, "_CONV_METHODS", {method: per_sample._CONV_METHODS[method]})
    monkeypatch.setattr(per_sample, "_CONV_METHOD", {})
    make, shape, shared = IN_PLACE_CASES[case]
    torch.manual_seed(2)
    reference = make()  # type: ignore[operator]
    model = copy.deepcopy(reference)
    engine = DirectPerSampleGradients(model, loss_reduction=reduction)
    try:
        for n in (8, 5, 10, 3, 12):
            for p in model.parameters():
                p.grad_sample = None
            if engine._storage is not None:
                engine._storage.fill_(float("nan"))  # stale rows must never be read
            x, y = torch.randn(n, *shape), torch.randint(0, 3, (n,))
            nn.functional.cross_entropy(model(x), y, reduction=reduction).backward()
            engine.restore()
            expected = _per_sample_loop(reference, x, y)
            for name, p in model.named_parameters():
                torch.testing.assert_close(p.grad_sample.to(expected[name].dtype), expected[name],
                                           rtol=1e-4, atol=1e-5, msg=f"{case} n={n} {name}")
            assert (per_sample._shared_buffer(list(model.parameters())) is not None) == shared
    finally:
        engine.close()


# --- batch padding (trainer._ModelLoss with pad_multiple) under the direct engine -----------


def _padded_backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor, multiple: int,
                     trim: bool = False) -> float:
    """One engine backward pass through the trainer's padded loss; the mean sample loss.

    With ``trim`` the engine keeps only the real rows (what ``train_dp`` does)."""
    engine = DirectPerSampleGradients(model, loss_reduction="sum")
    batch_loss = trainer_module._ModelLoss(model, nn.CrossEntropyLoss(), pad_multiple=multiple,
                                           reduction="sum")
    try:
        loss, to_mean = batch_loss(x, y)
        loss.backward()
    finally:
        engine.restore(rows=batch_loss.rows if trim else None)
        engine.close()
    assert batch_loss.rows == x.shape[0]
    return loss.item() * to_mean


PADDED_MODELS = [("cnn", 2, 16), ("densenet", 2, 16), ("cnn3d", 3, 8), ("dc-elm", 2, 16)]


@pytest.mark.parametrize("method", ["grouped", "unfold", "loop"])
@pytest.mark.parametrize(("name", "dims", "side"), PADDED_MODELS, ids=[m[0] for m in PADDED_MODELS])
@pytest.mark.parametrize("n", [6, 1])
def test_padded_batch_has_the_unpadded_per_sample_gradients_and_zero_extra_rows(
    monkeypatch: pytest.MonkeyPatch, method: str, name: str, dims: int, side: int, n: int,
) -> None:
    """Every conv method (pinned), every kind of direct model: the extra rows are exactly 0."""
    monkeypatch.setattr(per_sample, "_CONV_METHODS", {method: per_sample._CONV_METHODS[method]})
    monkeypatch.setattr(per_sample, "_CONV_METHOD", {})
    torch.manual_seed(12)
    model = build_model(name, in_channels=1, num_classes=2, image_size=side, spatial_dims=dims)
    x, y = torch.randn(n, 1, *([side] * dims)), torch.randint(0, 2, (n,))
    ref = _direct_samples(model, x, y)
    net = copy.deepcopy(model)
    mean_loss = _padded_backward(net, x, y, 4)
    rows = -(-n // 4) * 4
    assert rows > n
    for key, p in net.named_parameters():
        if not p.requires_grad:
            continue
        assert p.grad_sample.shape[0] == rows, key
        torch.testing.assert_close(p.grad_sample[:n], ref[key], rtol=1e-4, atol=1e-6, msg=key)
        assert bool((p.grad_sample[n:] == 0).all()), f"{key}: padded rows are not exactly zero"
    assert set(per_sample._CONV_METHOD.values()) <= {method}
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(x), y))
    assert mean_loss == pytest.approx(expected, rel=1e-5)


def test_trimmed_padded_batch_keeps_only_the_real_rows_of_the_buffer() -> None:
    torch.manual_seed(15)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    x, y = torch.randn(5, 1, 16, 16), torch.randint(0, 2, (5,))
    ref = _direct_samples(model, x, y)
    net = copy.deepcopy(model)
    _padded_backward(net, x, y, 4, trim=True)
    params = list(net.parameters())
    buffer = per_sample._shared_buffer(params)
    assert buffer is not None and buffer.shape == (5, sum(p.numel() for p in params))
    for key, p in net.named_parameters():
        assert p.grad_sample.shape[0] == 5, key
        torch.testing.assert_close(p.grad_sample, ref[key], rtol=1e-4, atol=1e-6, msg=key)


def test_rows_beyond_the_trim_never_reach_the_clipped_sum() -> None:
    """Even non-finite per-sample gradients in the dropped rows leave the step untouched."""
    torch.manual_seed(16)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(4 * 16, 2))
    x, y = torch.randn(8, 1, 6, 6), torch.randint(0, 2, (8,))
    x[5:] = float("inf")  # rows 5.. produce NaN everywhere
    grads = []
    for rows, data in ((5, x), (None, x[:5])):
        net = copy.deepcopy(model)
        engine = DirectPerSampleGradients(net)
        try:
            nn.functional.cross_entropy(net(data), y[: data.shape[0]]).backward()
        finally:
            engine.restore(rows=rows)
        params = list(net.parameters())
        if rows is not None:
            assert bool(params[0].grad_sample.isfinite().all())
        opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                                max_grad_norm=0.5, expected_batch_size=5)
        opt.pre_step()
        engine.close()
        grads.append([p.grad.clone() for p in params])
    for ours, ref in zip(grads[0], grads[1], strict=True):
        assert bool(ours.isfinite().all())
        # the padded pass's loss is a mean over 8 rows: its per-sample terms are the same
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-7)


def test_padded_batch_clips_to_the_unpadded_clipped_sum() -> None:
    torch.manual_seed(13)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    x, y = torch.randn(7, 1, 16, 16) * 3, torch.randint(0, 2, (7,))
    grads = []
    for multiple in (1, 8):
        net = copy.deepcopy(model)
        _padded_backward(net, x, y, multiple)
        params = list(net.parameters())
        assert per_sample._shared_buffer(params) is not None
        opt = DirectDPOptimizer(torch.optim.SGD(params, lr=0.1), noise_multiplier=0.0,
                                max_grad_norm=0.01, expected_batch_size=7)
        opt.pre_step()
        grads.append([p.grad.clone() for p in params])
    for ours, ref in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-8)


def test_train_dp_direct_runs_padded_batches_with_the_same_steps_noise_and_loss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    torch.manual_seed(14)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(60, 1, 16, 16), torch.randint(0, 2, (60,)))
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[0]))
    kwargs = dict(epochs=2, batch_size=10, learning_rate=0.1, noise_multiplier=0.8,
                  max_grad_norm=1.0, delta=1e-5, seed=5, grad_sample_mode="direct")
    assert trainer_module.DIRECT_PAD_MULTIPLE == 4
    padded = train_dp(model, data, **kwargs)  # type: ignore[arg-type]
    padded_sizes, sizes[:] = list(sizes), []
    monkeypatch.setattr(trainer_module, "DIRECT_PAD_MULTIPLE", 1)
    plain = train_dp(model, data, **kwargs)  # type: ignore[arg-type]
    assert all(s % 4 == 0 for s in padded_sizes)
    assert any(s % 4 for s in sizes), "no Poisson batch needed padding; pick another seed"
    assert [-(-s // 4) * 4 for s in sizes] == padded_sizes  # the same Poisson batches
    assert padded.steps == plain.steps and padded.accountant_state == plain.accountant_state
    assert padded.train_loss == pytest.approx(plain.train_loss, rel=1e-4)
    for name, value in plain.state_dict.items():  # same batches, same noise draws
        torch.testing.assert_close(padded.state_dict[name], value, rtol=0, atol=1e-4, msg=name)


def test_padding_and_summing_are_only_for_the_cross_entropy_path() -> None:
    model = build_model("dbn", in_channels=1, num_classes=2, image_size=16)
    with pytest.raises(ValueError, match="cross-entropy"):
        trainer_module._ModelLoss(model, nn.CrossEntropyLoss(), reduction="sum")
    cnn = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    autoencoder = build_model("autoencoder", in_channels=1, num_classes=2, image_size=16)
    for criterion in (trainer_module._PerSampleLoss(autoencoder.dp_loss_per_sample), nn.MSELoss(),
                      nn.CrossEntropyLoss(reduction="sum")):
        with pytest.raises(ValueError, match="cross-entropy"):
            trainer_module._ModelLoss(cnn, criterion, reduction="sum")
    with pytest.raises(ValueError, match="summed"):  # padding weighs rows through the sum
        trainer_module._ModelLoss(cnn, nn.CrossEntropyLoss(), pad_multiple=4)
    trainer_module._ModelLoss(cnn, nn.CrossEntropyLoss(), pad_multiple=4, reduction="sum")


def test_summed_loss_engine_gives_the_mean_loss_engines_per_sample_gradients() -> None:
    """``loss_reduction="sum"`` skips the engine's scaling; the gradients are the same."""
    torch.manual_seed(17)
    tied = nn.Linear(6, 6)
    model = nn.Sequential(  # conv, GroupNorm, a tied Linear
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(4, 6), tied, nn.Tanh(), tied, nn.Linear(6, 3),
    )
    x, y = torch.randn(6, 1, 6, 6) * 4, torch.randint(0, 3, (6,))
    ref = _direct_samples(model, x, y)
    net = copy.deepcopy(model)
    engine = DirectPerSampleGradients(net, loss_reduction="sum")
    try:
        nn.functional.cross_entropy(net(x), y, reduction="sum").backward()
    finally:
        engine.restore()
        engine.close()
    _assert_same({name: p.grad_sample for name, p in net.named_parameters()}, ref)
    with pytest.raises(ConfigError, match="loss_reduction"):
        DirectPerSampleGradients(net, loss_reduction="none")


def test_only_small_samples_are_padded() -> None:
    """Large samples (volumes) cost more per extra row than the kernel builds padding saves."""
    sizes: list[int] = []
    for side in (64, 65):  # 4,096 values (padded) and 4,225 (not)
        model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=8), nn.Flatten(), nn.LazyLinear(2))
        model.register_forward_pre_hook(lambda _m, inputs: sizes.append(inputs[0].shape[0]))
        batch_loss = trainer_module._ModelLoss(model, nn.CrossEntropyLoss(), pad_multiple=4,
                                               reduction="sum")
        loss, to_mean = batch_loss(torch.randn(5, 1, side, side), torch.randint(0, 2, (5,)))
        assert batch_loss.rows == 5 and to_mean == pytest.approx(1 / 5)
    assert trainer_module.DIRECT_PAD_MAX_SAMPLE_SIZE == 64 * 64
    assert sizes == [8, 5]


@pytest.mark.parametrize(("name", "reduction"), [("cnn", "sum"), ("dbn", "mean")])
def test_train_dp_direct_sums_the_loss_only_without_dp_loss(
    name: str, reduction: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model's own dp_loss is a batch mean: the engine must scale it; cross-entropy is summed."""
    seen: list[str] = []
    real = trainer_module.make_private_direct

    def spy(*args: object, **kwargs: object) -> object:
        seen.append(str(kwargs["loss_reduction"]))
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(trainer_module, "make_private_direct", spy)
    torch.manual_seed(18)
    model = build_model(name, in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.rand(24, 1, 16, 16), torch.randint(0, 2, (24,)))
    kwargs = dict(epochs=1, batch_size=8, learning_rate=0.1, noise_multiplier=0.0,
                  max_grad_norm=0.5, delta=1e-5, seed=4)
    direct = train_dp(model, data, grad_sample_mode="direct", **kwargs)  # type: ignore[arg-type]
    assert seen == [reduction]
    hooks = train_dp(model, data, grad_sample_mode="hooks", **kwargs)  # type: ignore[arg-type]
    assert direct.train_loss == pytest.approx(hooks.train_loss, rel=1e-3)
    for key, value in hooks.state_dict.items():  # the same clipped steps as Opacus's
        torch.testing.assert_close(direct.state_dict[key], value, rtol=0, atol=1e-3, msg=key)
