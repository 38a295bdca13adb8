"""A DP step's Poisson batch run as several physical batches (``restore(more=True)``,
``train_dp(physical_batch_size=...)``, the node's ``physical-batch-size``) gives the per-sample
norms and clipped sums of the whole batch, equal to Opacus's on the unsplit batch: buffer
columns, ghost linear and recurrent layers, convolutions keeping output gradients by both norm
methods, tied layers, padded parts, float64."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from client.training import trainer
from client.training.ghost import GhostRows, ghost_record
from client.training.per_sample import DirectDPOptimizer, DirectPerSampleGradients
from client.training.trainer import DIRECT_PAD_MULTIPLE, train_dp
from common.config import NodeConfig
from common.errors import ConfigError
from common.models.registry import build_model
from tests.client.training.test_ghost import CLIP, _assert_equal, _Convs, _reference, _Tied


def _in_parts(model: nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, *, reserve: bool = True,
              steps: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], DirectPerSampleGradients]:
    """The trainer's parts: each run padded to a multiple of 4 (repeated rows) on a summed
    loss and trimmed by ``restore(rows=..., more=...)``; norms and clipped sums of the last of
    ``steps`` steps (earlier steps lay the buffer out, as a node's first step does)."""
    net = copy.deepcopy(model)
    engine = DirectPerSampleGradients(net, loss_reduction="sum", ghost_linear=True, ghost_conv=True)
    named = [(k, p) for k, p in net.named_parameters() if p.requires_grad]
    n = x.shape[0]
    try:
        for _ in range(steps):
            for _, p in named:
                p.grad_sample = None
            if reserve:
                engine.reserve(n + DIRECT_PAD_MULTIPLE)
            starts = list(range(0, n, size))
            for k, a in enumerate(starts):
                xs, ys = x[a:a + size], y[a:a + size]
                rows = len(ys)
                padded = xs[torch.arange(-(-rows // 4) * 4) % rows]
                nn.functional.cross_entropy(net(padded)[:rows], ys, reduction="sum").backward()
                engine.restore(rows=rows, more=k < len(starts) - 1)
    finally:
        engine.close()
    norms = {}
    for k, p in named:
        assert p.grad_sample.shape[0] == n, k
        norms[k] = (p.grad_sample.clone() if ghost_record(p.grad_sample) is not None
                    else p.grad_sample.flatten(1).square().sum(1))
    opt = DirectDPOptimizer(torch.optim.SGD([p for _, p in named], lr=0.1), noise_multiplier=0.0,
                            max_grad_norm=CLIP, expected_batch_size=4, loss_reduction="mean")
    opt.pre_step()
    return norms, {k: p.grad.clone() for k, p in named}, engine


@pytest.fixture
def all_convolutions(monkeypatch: pytest.MonkeyPatch) -> None:
    from client.training import ghost

    monkeypatch.setattr(ghost, "CONV_MIN_WEIGHTS", 0)


@pytest.mark.parametrize("size", [3, 5])
def test_parts_of_a_batch_give_opacus_norms_and_sums_for_every_kind_of_layer(
        size: int, all_convolutions: None) -> None:
    torch.manual_seed(11)
    convs = _Convs()  # a buffer convolution, both ghost norm methods, a 1D sequence
    x, y = torch.randn(11, 1, 10, 10) * 2, torch.randint(0, 3, (11,))
    norms, sums, _ = _in_parts(convs, x, y, size, steps=2)
    _assert_equal((norms, sums), _reference(convs, x, y))
    assert bool((sum(norms.values()).sqrt() > CLIP).any())  # clipping mattered
    for name in ("lstm", "mlp"):  # ghost linear layers over time steps, and plain ones
        torch.manual_seed(12)
        model = build_model(name, in_channels=1, num_classes=2, image_size=8)
        xm, ym = torch.randn(9, 1, 8, 8), torch.randint(0, 2, (9,))
        _assert_equal(_in_parts(model, xm, ym, size)[:2], _reference(model, xm, ym))


def test_tied_layers_and_float64_in_parts_equal_opacus(all_convolutions: None) -> None:
    torch.manual_seed(13)
    tied = _Tied()
    x, y = torch.randn(7, 6), torch.randint(0, 3, (7,))
    _assert_equal(_in_parts(tied, x, y, 3)[:2], _reference(tied, x, y))
    model = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool3d(2),
                          nn.Conv3d(4, 8, 3, padding=1), nn.Flatten(), nn.Linear(64, 2)).double()
    x3, y3 = torch.randn(6, 1, 4, 4, 4, dtype=torch.float64), torch.randint(0, 2, (6,))
    _assert_equal(_in_parts(model, x3, y3, 4)[:2], _reference(model, x3, y3), rtol=1e-10, atol=1e-12)


def test_parts_join_as_one_view_of_the_buffer_and_ghost_layers_as_rows_of_records(
        all_convolutions: None) -> None:
    torch.manual_seed(14)
    convs = _Convs()
    x, y = torch.randn(10, 1, 10, 10), torch.randint(0, 3, (10,))
    net = copy.deepcopy(convs)
    engine = DirectPerSampleGradients(net, loss_reduction="sum", ghost_linear=True, ghost_conv=True)
    for _ in range(2):  # the second step has a laid-out buffer to reserve
        for p in net.parameters():
            p.grad_sample = None
        engine.reserve(10 + DIRECT_PAD_MULTIPLE)
        for k, a in enumerate(range(0, 10, 4)):
            nn.functional.cross_entropy(net(x[a:a + 4]), y[a:a + 4], reduction="sum").backward()
            engine.restore(rows=len(y[a:a + 4]), more=a + 4 < 10)
            if a + 4 < 10:  # kept aside between parts: nothing for an optimiser to clip yet
                assert all(getattr(p, "grad_sample", None) is None for p in net.parameters())
    kinds = {type(ghost_record(p.grad_sample)) for p in net.parameters()}
    assert GhostRows in kinds and type(None) in kinds
    for p in net.parameters():
        if ghost_record(p.grad_sample) is None:  # the buffer's columns: one view, no copy
            assert p.grad_sample._base is engine._storage and p.grad_sample.shape[0] == 10
    engine.close()


def test_a_first_step_without_a_laid_out_buffer_joins_by_copy_and_still_equals_opacus(
        all_convolutions: None) -> None:
    torch.manual_seed(15)
    convs = _Convs()
    x, y = torch.randn(9, 1, 10, 10), torch.randint(0, 3, (9,))
    _assert_equal(_in_parts(convs, x, y, 4, reserve=False)[:2], _reference(convs, x, y))


def test_parts_that_reach_different_layers_are_refused() -> None:
    class _Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x) if x.shape[0] > 2 else self.b(x)

    net = _Branch()
    engine = DirectPerSampleGradients(net, loss_reduction="sum", ghost_linear=True)
    y = torch.zeros(3, dtype=torch.long)
    nn.functional.cross_entropy(net(torch.randn(3, 4)), y, reduction="sum").backward()
    engine.restore(rows=3, more=True)
    nn.functional.cross_entropy(net(torch.randn(2, 4)), y[:2], reduction="sum").backward()
    with pytest.raises(RuntimeError, match="different parameters"):
        engine.restore(rows=2)
    engine.close()


def test_train_dp_in_parts_takes_the_same_steps_to_the_same_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(16)
    model = build_model("cnn", in_channels=1, num_classes=2, image_size=16)
    data = TensorDataset(torch.randn(96, 1, 16, 16), torch.randint(0, 2, (96,)))
    kw = dict(epochs=1, batch_size=32, learning_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0,
              delta=1e-5, seed=5, grad_sample_mode="direct")
    parts: list[int] = []
    split = trainer._Parts.split

    def counted(self: trainer._Parts, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = split(self, images, labels)
        parts.append(len(out))
        return out

    monkeypatch.setattr(trainer._Parts, "split", counted)
    whole = train_dp(model, data, **kw)
    assert parts and set(parts) == {1}  # 2D images: whole batches by default
    parts.clear()
    split_run = train_dp(model, data, **kw, physical_batch_size=8)
    assert len(parts) == whole.steps and all(k >= 2 for k in parts)  # every Poisson batch > 8
    assert split_run.steps == whole.steps and split_run.epsilon == whole.epsilon
    for key, value in whole.state_dict.items():
        torch.testing.assert_close(split_run.state_dict[key], value, rtol=1e-4, atol=1e-5, msg=key)
    with pytest.raises(ConfigError, match="physical_batch_size"):
        train_dp(model, data, **kw, physical_batch_size=-1)


def test_by_default_volumes_through_convolutions_run_in_parts_of_half_the_batch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[int]] = []
    split = trainer._Parts.split

    def sizes(self: trainer._Parts, images: torch.Tensor, labels: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = split(self, images, labels)
        seen.append([len(y) for _, y in out])
        return out

    monkeypatch.setattr(trainer._Parts, "split", sizes)
    kw = dict(epochs=1, batch_size=16, learning_rate=0.05, noise_multiplier=1.0, max_grad_norm=1.0,
              delta=1e-5, seed=6, grad_sample_mode="direct")
    torch.manual_seed(17)
    volume = build_model("cnn3d", in_channels=1, num_classes=2, image_size=17, spatial_dims=3)  # 4,913 > 4,096 values
    train_dp(volume, TensorDataset(torch.randn(48, 1, 17, 17, 17), torch.randint(0, 2, (48,))), **kw)
    assert seen and all(max(s) <= 8 for s in seen) and any(len(s) > 1 for s in seen)
    seen.clear()
    train_dp(volume, TensorDataset(torch.randn(48, 1, 17, 17, 17), torch.randint(0, 2, (48,))), **kw,
             physical_batch_size=0)  # whole batches asked for
    assert seen == []
    image = build_model("cnn", in_channels=1, num_classes=2, image_size=64)  # 4,096 values
    train_dp(image, TensorDataset(torch.randn(48, 1, 64, 64), torch.randint(0, 2, (48,))), **kw)
    assert seen and all(len(s) == 1 for s in seen)
    seen.clear()  # a model without convolutions runs volumes whole
    slices = build_model("lstm", in_channels=1, num_classes=2, image_size=17, spatial_dims=3)
    train_dp(slices, TensorDataset(torch.randn(48, 1, 17, 17, 17), torch.randint(0, 2, (48,))), **kw)
    assert all(len(s) == 1 for s in seen)


def test_the_node_config_carries_the_physical_batch_size(tmp_path: object) -> None:
    node = NodeConfig.from_user_config({"data-dir": "/data", "physical-batch-size": 16})
    assert node.physical_batch_size == 16
    assert NodeConfig.from_user_config({"data-dir": "/data"}).physical_batch_size == 0  # automatic
    with pytest.raises(ConfigError, match="physical-batch-size"):
        NodeConfig.from_user_config({"data-dir": "/data", "physical-batch-size": -1})
