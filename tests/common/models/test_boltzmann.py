"""DBN and DBM: CD/mean-field surrogate gradients, Opacus steps per phase, learning."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine
from opacus.validators import ModuleValidator
from torch.utils.data import DataLoader, TensorDataset

from common.errors import ConfigError
from common.models.boltzmann import DBM, DBN, RBM, build_dbm, build_dbn

torch.set_num_threads(1)


def _binary_patterns(n: int, seed: int, side: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes of binary ``side x side`` images (top half vs left half on), 5 % flips."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.zeros((n, 1, side, side))
    x[y == 0, :, : side // 2, :] = 1.0
    x[y == 1, :, :, : side // 2] = 1.0
    flips = torch.rand(x.shape, generator=gen) < 0.05
    return torch.where(flips, 1.0 - x, x), y


def _grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {
        n: p.grad.detach().double().numpy().copy()
        for n, p in model.named_parameters()
        if p.grad is not None
    }


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


@pytest.mark.parametrize("builder", [build_dbn, build_dbm])
@pytest.mark.parametrize("dims", [2, 3])
def test_forward_shape_and_opacus_valid(builder: Any, dims: int) -> None:
    model = builder(in_channels=1, num_classes=3, image_size=8, spatial_dims=dims)
    x = torch.rand((5, 1, *([8] * dims)))
    assert model(x).shape == (5, 3)
    assert ModuleValidator.validate(model, strict=True) == []
    assert model.phase == "finetune"


def test_cd_surrogate_gradient_equals_analytic_cd_update() -> None:
    # Prepare: a tiny RBM with non-trivial weights and a fixed model sample
    torch.manual_seed(0)
    rbm = RBM(6, 4)
    with torch.no_grad():
        rbm.hidden.weight.normal_(0.0, 0.5)
        rbm.hidden.bias.normal_(0.0, 0.5)
        rbm.visible_bias.weight.normal_(0.0, 0.5)
    v = torch.rand((5, 6))
    torch.manual_seed(1)
    v_model = rbm.gibbs(v, steps=2)
    # Execute: autograd gradient of the surrogate, through cd_loss with the same chain
    torch.manual_seed(1)
    rbm.cd_loss(v, steps=2).backward()
    got = _grads(rbm)
    # Assert: minus the CD update, computed by hand in numpy
    w = rbm.hidden.weight.detach().double().numpy()
    c = rbm.hidden.bias.detach().double().numpy()
    vd, vm = v.double().numpy(), v_model.double().numpy()
    hd, hm = _sigmoid(vd @ w.T + c), _sigmoid(vm @ w.T + c)
    n = len(vd)
    delta_w = (hd.T @ vd - hm.T @ vm) / n  # <h v^T>_data - <h v^T>_model
    np.testing.assert_allclose(got["hidden.weight"], -delta_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["hidden.bias"], -(hd - hm).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        got["visible_bias.weight"][0], -(vd - vm).mean(0), rtol=1e-5, atol=1e-6
    )


def test_dbm_surrogate_gradient_equals_analytic_update() -> None:
    # Prepare
    torch.manual_seed(0)
    dbm = DBM(6, 2, hidden=(4, 3))
    with torch.no_grad():
        for p in dbm.parameters():
            p.normal_(0.0, 0.5)
    dbm.set_phase("pretrain")
    v = torch.rand((5, 6))
    torch.manual_seed(3)
    mu1, mu2 = dbm.mean_field(v)
    v_m, h1_m, h2_m = dbm.gibbs(v, torch.bernoulli(mu2))
    # Execute
    torch.manual_seed(3)
    dbm.dp_loss(v.reshape(5, 1, 2, 3), torch.zeros(5)).backward()
    got = _grads(dbm)
    # Assert: <v h1^T>, <h1 h2^T> data (mean field) minus model (Gibbs), with minus sign
    a = [t.double().numpy() for t in (v, mu1, mu2, v_m, h1_m, h2_m)]
    vd, m1, m2, vm, s1, s2 = a
    n = len(vd)
    np.testing.assert_allclose(got["layer1.weight"], -(m1.T @ vd - s1.T @ vm) / n, atol=1e-6)
    np.testing.assert_allclose(got["layer2.weight"], -(m2.T @ m1 - s2.T @ s1) / n, atol=1e-6)
    np.testing.assert_allclose(got["layer1.bias"], -(m1 - s1).mean(0), atol=1e-6)
    np.testing.assert_allclose(got["visible_bias.weight"][0], -(vd - vm).mean(0), atol=1e-6)
    assert "head.weight" not in got  # the head does not train while pretraining


def test_opacus_per_sample_grads_exact_for_repeated_layer_calls() -> None:
    # The free energy calls the same Linear twice (data and model sample): Opacus must
    # still give each sample's own gradient.
    torch.manual_seed(0)
    rbm = RBM(6, 4)
    v = torch.rand((4, 6))
    v_model = rbm.gibbs(v, 1)
    gsm = GradSampleModule(rbm)
    (rbm.free_energy(v) - rbm.free_energy(v_model)).mean().backward()
    per_sample = rbm.hidden.weight.grad_sample.clone()  # type: ignore[attr-defined]
    gsm._close()
    for i in range(4):
        rbm.zero_grad()
        (rbm.free_energy(v[i : i + 1]) - rbm.free_energy(v_model[i : i + 1])).sum().backward()
        torch.testing.assert_close(per_sample[i], rbm.hidden.weight.grad)


PHASES = [
    (lambda: DBN(16, 2, hidden=(8, 4)), "pretrain", 0),
    (lambda: DBN(16, 2, hidden=(8, 4)), "pretrain", 1),
    (lambda: DBN(16, 2, hidden=(8, 4)), "finetune", None),
    (lambda: DBM(16, 2, hidden=(8, 4)), "pretrain", None),
    (lambda: DBM(16, 2, hidden=(8, 4)), "finetune", None),
]


@pytest.mark.parametrize(("make", "phase", "layer"), PHASES)
def test_opacus_dp_sgd_steps_in_each_phase(make: Any, phase: str, layer: int | None) -> None:
    # Prepare
    torch.manual_seed(0)
    model = make()
    model.set_phase(phase, layer=layer)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = _binary_patterns(32, seed=0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=DataLoader(TensorDataset(x, y), batch_size=8),
        noise_multiplier=0.5,
        max_grad_norm=1.0,
    )
    # Execute: two DP-SGD steps through the inner module's dp_loss
    steps = 0
    for xb, yb in loader:
        dp_opt.zero_grad()
        loss = dp_model._module.dp_loss(xb, yb)
        loss.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                assert p.grad_sample.shape == (len(xb), *p.shape), name
        dp_opt.step()
        steps += 1
        if steps == 2:
            break
    # Assert: exactly the phase's parameters moved; forward still returns logits
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == trainable
    assert dp_model(x[:3]).shape == (3, 2)
    assert engine.accountant.get_epsilon(delta=1e-5) > 0


def _train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, lr: float) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.5)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (16,), generator=gen)
        opt.zero_grad()
        model.dp_loss(x[idx], y[idx]).backward()  # type: ignore[operator]
        opt.step()


def test_dbn_pretraining_lowers_reconstruction_error_and_finetuning_learns() -> None:
    # Prepare
    torch.manual_seed(0)
    x, y = _binary_patterns(128, seed=1)
    xt, yt = _binary_patterns(64, seed=2)
    dbn = DBN(16, 2, hidden=(8, 4))
    # Execute / Assert: greedy layer-wise pretraining, then fine-tuning
    for layer in range(2):
        before = float(dbn.reconstruction_error(x, layer).mean())
        dbn.set_phase("pretrain", layer=layer)
        _train(dbn, x, y, steps=300, lr=0.5)
        after = float(dbn.reconstruction_error(x, layer).mean())
        assert after < 0.6 * before, (layer, before, after)
    dbn.set_phase("finetune")
    loss_before = float(dbn.dp_loss(x, y))
    _train(dbn, x, y, steps=200, lr=0.5)
    assert float(dbn.dp_loss(x, y)) < 0.5 * loss_before
    accuracy = float((dbn(xt).argmax(1) == yt).float().mean())
    assert accuracy >= 0.9


def test_dbm_joint_training_lowers_reconstruction_error_and_finetuning_learns() -> None:
    torch.manual_seed(0)
    x, y = _binary_patterns(128, seed=3)
    xt, yt = _binary_patterns(64, seed=4)
    dbm = DBM(16, 2, hidden=(8, 4))
    before = float(dbm.reconstruction_error(x).mean())
    dbm.set_phase("pretrain")
    _train(dbm, x, y, steps=300, lr=0.5)
    after = float(dbm.reconstruction_error(x).mean())
    assert after < 0.6 * before, (before, after)
    assert dbm.embed(x).shape == (128, 4)
    dbm.set_phase("finetune")
    loss_before = float(dbm.dp_loss(x, y))
    _train(dbm, x, y, steps=200, lr=0.5)
    assert float(dbm.dp_loss(x, y)) < 0.5 * loss_before
    accuracy = float((dbm(xt).argmax(1) == yt).float().mean())
    assert accuracy >= 0.9


def test_phase_errors_and_trainable_sets() -> None:
    dbn = DBN(16, 2, hidden=(8, 4))
    with pytest.raises(ConfigError):
        dbn.set_phase("pretrain")  # layer missing
    with pytest.raises(ConfigError):
        dbn.set_phase("pretrain", layer=2)
    with pytest.raises(ConfigError):
        dbn.set_phase("sleep")  # type: ignore[arg-type]
    dbn.set_phase("pretrain", layer=1)
    assert {n for n, p in dbn.named_parameters() if p.requires_grad} == {
        "rbms.1.hidden.weight",
        "rbms.1.hidden.bias",
        "rbms.1.visible_bias.weight",
    }
    dbm = DBM(16, 2, hidden=(8, 4))
    with pytest.raises(ConfigError):
        dbm.set_phase("pretrain", layer=0)
    assert not dbm.visible_bias.weight.requires_grad  # unused by fine-tuning


@pytest.mark.parametrize(("phase", "layer"), [("pretrain", 0), ("pretrain", 1), ("finetune", None)])
def test_train_dp_follows_the_phase_set_before_the_call(phase: str, layer: int | None) -> None:
    from client.training import train_dp

    # Prepare
    torch.manual_seed(0)
    model = DBN(16, 2, hidden=(8, 4))
    model.set_phase(phase, layer=layer)  # type: ignore[arg-type]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    x, y = _binary_patterns(24, seed=5)
    # Execute
    result = train_dp(
        model,
        TensorDataset(x, y),
        epochs=1,
        batch_size=8,
        learning_rate=0.1,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        delta=1e-5,
        seed=0,
    )
    # Assert: only the phase's parameters changed; the caller's model is untouched
    before = model.state_dict()
    changed = {k for k, v in result.state_dict.items() if not torch.equal(v, before[k])}
    assert changed == trainable
    assert np.isfinite(result.epsilon) and result.steps == 3
