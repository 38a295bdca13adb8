"""Contract suite over every model that serves the ``reconstruction`` task.

Each model's ``reconstruction_loss_per_sample`` (through
:meth:`common.tasks.reconstruction.ReconstructionTask.model_loss`) must be a finite ``[B]``
loss whose row ``i`` does not move when another row changes (DP-SGD's per-sample clipping),
whose per-sample gradients under an Opacus ``GradSampleModule`` are each row's own gradient,
which non-private SGD lowers on structured data, and with which ``train_dp`` trains the model
privately (only the parameters of ``reconstruction_modules``, never the head).
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import pytest
import torch
from opacus import GradSampleModule
from torch import nn
from torch.utils.data import TensorDataset

from client.training import train_dp
from common.models import build_model, list_models
from common.tasks import RECONSTRUCTION

SIZE = 8
BATCH = 4
DELTA = 1e-5

MODELS = [spec.name for spec in list_models() if "reconstruction" in spec.tasks]


def _patterns(n: int, seed: int, size: int = SIZE) -> torch.Tensor:
    """Structured images in [0, 1]: the top or the left half on, 5 % of pixels flipped."""
    gen = torch.Generator().manual_seed(seed)
    kind = torch.randint(0, 2, (n,), generator=gen)
    x = torch.zeros((n, 1, size, size))
    x[kind == 0, :, : size // 2, :] = 1.0
    x[kind == 1, :, :, : size // 2] = 1.0
    flips = torch.rand(x.shape, generator=gen) < 0.05
    return torch.where(flips, 1.0 - x, x)


def _model(name: str, dims: int = 2) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, image_size=SIZE, spatial_dims=dims)
    RECONSTRUCTION.prepare_model(model)
    return model.train()


def _seeded_loss(model: nn.Module, inputs: torch.Tensor, seed: int = 7) -> torch.Tensor:
    torch.manual_seed(seed)  # the same Gibbs / corruption draws for the same batch shape
    return RECONSTRUCTION.model_loss(model, inputs)


def test_dbn_dbm_and_every_autoencoder_serve_reconstruction() -> None:
    assert {"dbn", "dbm", "autoencoder", "autoencoder-denoising",
            "autoencoder-sparse"} <= set(MODELS)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("name", MODELS)
def test_loss_is_finite_and_per_sample(name: str, dims: int) -> None:
    # Prepare
    model = _model(name, dims)
    gen = torch.Generator().manual_seed(1)
    inputs = torch.rand((BATCH, 1, *([SIZE] * dims)), generator=gen)
    changed = inputs.clone()
    changed[2] = torch.rand(changed[2].shape, generator=gen)
    # Execute
    loss = _seeded_loss(model, inputs)
    with torch.no_grad():
        moved = _seeded_loss(model, changed)
    # Assert: one finite value per row; only row 2 may move
    assert loss.shape == (BATCH,) and bool(torch.isfinite(loss).all())
    keep = torch.tensor([0, 1, 3])
    torch.testing.assert_close(loss[keep].detach(), moved[keep], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(loss[2].detach(), moved[2])


@pytest.mark.parametrize("name", MODELS)
def test_only_the_reconstruction_modules_train(name: str) -> None:
    # Prepare
    model = _model(name)
    inner: Any = model
    trained = {id(p) for m in inner.reconstruction_modules() for p in m.parameters()}
    # Execute
    RECONSTRUCTION.model_loss(model, _patterns(BATCH, seed=2)).sum().backward()
    # Assert: every trainable parameter gets a gradient, the others (the head) none
    for pname, p in model.named_parameters():
        assert p.requires_grad == (id(p) in trained), pname
        assert (p.grad is not None) == p.requires_grad, pname
    assert not any(p.requires_grad for p in inner.head.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_grad_sample_module_gives_each_rows_own_gradient(name: str) -> None:
    # Prepare: the reference per-row gradients of the bare model, same random draws
    model = _model(name)
    inputs = _patterns(BATCH, seed=3)
    reference = copy.deepcopy(model)
    loss = _seeded_loss(reference, inputs)
    params = [p for p in reference.parameters() if p.requires_grad]
    rows = [torch.autograd.grad(loss[i], params, retain_graph=True) for i in range(BATCH)]
    # Execute: the task's loss called on the Opacus wrapper
    wrapped = GradSampleModule(model, loss_reduction="sum")
    _seeded_loss(wrapped, inputs).sum().backward()
    # Assert
    trainable = [p for p in model.parameters() if p.requires_grad]
    for j, p in enumerate(trainable):
        expected = torch.stack([rows[i][j] for i in range(BATCH)])
        torch.testing.assert_close(p.grad_sample, expected, rtol=1e-4, atol=1e-6)  # type: ignore[attr-defined]
    wrapped._close()


def _monitored(model: nn.Module, x: torch.Tensor) -> float:
    """What training must lower: a DBN's or DBM's reconstruction error (the value of their CD
    surrogate is no error: only its gradient is meaningful), else the objective itself."""
    error = getattr(model, "reconstruction_error", None)
    if callable(error):
        return float(error(x).mean())
    return float(_seeded_loss(model, x).detach().mean())


@pytest.mark.parametrize("name", MODELS)
def test_non_private_sgd_lowers_the_loss_on_structured_data(name: str) -> None:
    # Prepare
    model = _model(name)
    x = _patterns(64, seed=4)
    before = _monitored(model, x)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    gen = torch.Generator().manual_seed(5)
    # Execute
    for _ in range(30):
        batch = x[torch.randint(0, len(x), (16,), generator=gen)]
        optimizer.zero_grad()
        RECONSTRUCTION.model_loss(model, batch).mean().backward()
        optimizer.step()
    # Assert
    after = _monitored(model, x)
    assert after < 0.9 * before, (before, after)


class _OwnLoss(nn.Module):
    """A network whose ``dp_loss`` is the reconstruction task's loss (the trainer's hook)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(inputs)
        return out

    def dp_loss_per_sample(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return RECONSTRUCTION.model_loss(self.net, inputs, targets)

    def dp_loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.dp_loss_per_sample(inputs, targets).mean()


def _private_run(model: nn.Module, mode: str, **loss: Any) -> dict[str, torch.Tensor]:
    x = _patterns(32, seed=6)
    result = train_dp(
        model, TensorDataset(x, torch.zeros(len(x), dtype=torch.long)), epochs=1, batch_size=8,
        learning_rate=0.05, noise_multiplier=0.5, max_grad_norm=1.0, delta=DELTA,
        private=True, seed=0, grad_sample_mode=mode, **loss,
    )
    assert 0 < result.epsilon < float("inf") and result.steps > 0
    assert result.train_loss == result.train_loss  # not NaN
    return result.state_dict


def _moved(before: nn.Module, after: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    return {n for n, p in before.named_parameters()
            if not torch.equal(p.detach(), after[prefix + n])}


RUNS = [(name, mode) for name in MODELS
        for mode in (("hooks", "direct") if name in ("dbn", "dbm") else ("hooks", "ghost"))]


@pytest.mark.parametrize(("name", "mode"), RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_train_dp_trains_privately_on_the_task_loss(name: str, mode: str) -> None:
    # Prepare
    model = _model(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # Execute: through a model's own dp_loss hook, wrapping the task's loss
    state = _private_run(_OwnLoss(model), mode)
    # Assert: exactly the reconstruction modules moved (the head did not)
    assert _moved(model, state, prefix="net.") == trainable


@pytest.mark.skipif("input_loss" not in inspect.signature(train_dp).parameters,
                    reason="train_dp takes no input_loss criterion")
@pytest.mark.parametrize(("name", "mode"), RUNS, ids=[f"{n}-{m}" for n, m in RUNS])
def test_train_dp_input_loss_is_the_task_loss(name: str, mode: str) -> None:
    model = _model(name)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    state = _private_run(model, mode, input_loss=RECONSTRUCTION.model_loss)
    assert _moved(model, state) == trainable
