"""DC-ELM: closed-form readout, federated sufficient statistics, DP release, DP-SGD step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from opacus.validators import ModuleValidator
from sklearn.linear_model import Ridge

from common.errors import ConfigError, PrivacyConfigError
from common.models.dcelm import DCELM, build_dcelm, noisy_statistics, readout_row_scale

torch.set_num_threads(1)


def _toy(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images with a bright square (label 1) or without (label 0), plus noise."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.rand((n, 1, size, size), generator=gen)
    y = torch.randint(0, 2, (n,), generator=gen)
    for i in range(n):
        if y[i]:
            r, c = torch.randint(0, size - 6, (2,), generator=gen).tolist()
            x[i, 0, r : r + 6, c : c + 6] += 0.7
    return x, y


@pytest.mark.parametrize(("dims", "size"), [(2, 16), (3, 8)])
def test_forward_shape_and_opacus_valid(dims: int, size: int) -> None:
    # Prepare
    model = build_dcelm(in_channels=1, num_classes=3, image_size=size, spatial_dims=dims)
    x = torch.rand((4, 1, *([size] * dims)))
    # Execute
    logits = model(x)
    h = model.features(x)  # type: ignore[operator]
    # Assert
    assert logits.shape == (4, 3)
    assert h.shape == (4, model.feature_dim)  # type: ignore[union-attr]
    assert torch.all(h[:, -1] == 1.0)  # bias column
    assert ModuleValidator.validate(model, strict=True) == []
    # Only the readout is trainable; the filters are buffers shared via the seed.
    assert [n for n, _ in model.named_parameters()] == ["readout.weight"]


def test_same_seed_same_filters_at_every_hospital() -> None:
    a, b = DCELM(1, 2), DCELM(1, 2)
    assert torch.equal(a.filters1, b.filters1) and torch.equal(a.filters2, b.filters2)
    assert not torch.equal(DCELM(1, 2, seed=1).filters1, a.filters1)


def test_federated_statistics_equal_pooled_closed_form() -> None:
    # Prepare: three hospitals of different sizes
    model = DCELM(1, 2)
    parts = [_toy(n, seed) for n, seed in ((23, 1), (41, 2), (17, 3))]
    ridge = 0.5
    # Execute: each hospital computes its sums; the coordinator adds and solves
    stats = [model.readout_statistics(x, y) for x, y in parts]
    hth = sum(s[0] for s in stats)
    hty = sum(s[1] for s in stats)
    n = sum(s[2] for s in stats)
    beta = DCELM.solve_readout(hth, hty, ridge)  # type: ignore[arg-type]
    # Assert: pooled numpy solve and sklearn Ridge on the pooled features
    x_all = torch.cat([p[0] for p in parts])
    y_all = torch.cat([p[1] for p in parts])
    h_all = model.features(x_all).double().numpy()
    y_onehot = np.eye(2)[y_all.numpy()]
    d = h_all.shape[1]
    expected = np.linalg.solve(h_all.T @ h_all + ridge * np.eye(d), h_all.T @ y_onehot)
    assert n == len(y_all)
    np.testing.assert_allclose(beta.numpy(), expected, rtol=1e-6, atol=1e-8)
    sk = Ridge(alpha=ridge, fit_intercept=False, solver="cholesky").fit(h_all, y_onehot)
    np.testing.assert_allclose(beta.numpy(), sk.coef_.T, rtol=1e-5, atol=1e-7)


def test_closed_form_readout_learns_toy_task() -> None:
    model = DCELM(1, 2)
    x, y = _toy(120, seed=4)
    xt, yt = _toy(60, seed=5)
    before = float((model(xt).argmax(1) == yt).float().mean())
    model.fit_readout(x, y, ridge=1e-2)
    after = float((model(xt).argmax(1) == yt).float().mean())
    assert after >= 0.9
    assert after > before


def test_row_clipping_bounds_each_patient() -> None:
    # Prepare: 5 patients with 1-4 images each
    model = DCELM(1, 2)
    x, y = _toy(12, seed=6)
    patients = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4, 4])
    clip = 0.7
    # Execute
    h = model.features(x).double()
    scaled = h * readout_row_scale(h, clip=clip, patient_index=patients)[:, None]
    hth, hty, _ = model.readout_statistics(x, y, clip=clip, patient_index=patients)
    # Assert: summed row norms per patient <= clip, and removing one patient changes the
    # statistics by at most the documented sensitivities.
    norms = torch.linalg.vector_norm(scaled, dim=1)
    for p in range(5):
        assert float(norms[patients == p].sum()) <= clip + 1e-9
        keep = patients != p
        renumbered = torch.unique(patients[keep], return_inverse=True)[1]
        hth_p, hty_p, _ = model.readout_statistics(
            x[keep], y[keep], clip=clip, patient_index=renumbered
        )
        assert float(torch.linalg.matrix_norm(hth - hth_p)) <= clip**2 + 1e-9
        assert float(torch.linalg.matrix_norm(hty - hty_p)) <= clip + 1e-9


def test_noisy_statistics_symmetric_calibrated_and_described() -> None:
    # Prepare
    d, k = 30, 2
    hth = torch.zeros((d, d), dtype=torch.float64)
    hty = torch.zeros((d, k), dtype=torch.float64)
    sigma, clip = 1.3, 0.5
    # Execute
    noisy_hth, noisy_hty, mechanism = noisy_statistics(
        hth, hty, noise_multiplier=sigma, clip=clip, generator=torch.Generator().manual_seed(0)
    )
    # Assert
    assert torch.equal(noisy_hth, noisy_hth.T)
    expected_sd = sigma * math.sqrt(clip**4 + clip**2)
    entries = torch.cat([noisy_hth[torch.triu_indices(d, d).unbind()], noisy_hty.reshape(-1)])
    assert abs(float(entries.std()) / expected_sd - 1.0) < 0.1  # 525 draws
    assert mechanism == {"kind": "gaussian", "noise_multiplier": sigma, "steps": 1}
    with pytest.raises(PrivacyConfigError):
        noisy_statistics(hth, hty, noise_multiplier=0.0, clip=clip)
    with pytest.raises(PrivacyConfigError):
        noisy_statistics(hth, hty, noise_multiplier=1.0, clip=-1.0)


def test_dp_release_still_learns_with_large_ridge() -> None:
    model = DCELM(1, 2)
    x, y = _toy(400, seed=7)
    xt, yt = _toy(100, seed=8)
    hth, hty, _ = model.readout_statistics(x, y, clip=1.0)
    noisy_hth, noisy_hty, _ = noisy_statistics(
        hth, hty, noise_multiplier=1.0, clip=1.0, generator=torch.Generator().manual_seed(1)
    )
    model.set_readout(DCELM.solve_readout(noisy_hth, noisy_hty, ridge=50.0))
    assert float((model(xt).argmax(1) == yt).float().mean()) >= 0.75


def test_dp_sgd_step_on_readout_has_per_sample_grads() -> None:
    # Prepare
    model = DCELM(1, 2)
    filters = model.filters1.clone()
    gsm = GradSampleModule(model)
    x, y = _toy(6, seed=9)
    # Execute
    loss = torch.nn.functional.cross_entropy(gsm(x), y)
    loss.backward()
    # Assert
    gs = model.readout.weight.grad_sample  # type: ignore[attr-defined]
    assert gs.shape == (6, *model.readout.weight.shape)
    torch.testing.assert_close(gs.mean(0), model.readout.weight.grad)
    assert torch.equal(model.filters1, filters)


def test_invalid_arguments() -> None:
    with pytest.raises(ConfigError):
        build_dcelm(in_channels=1, num_classes=2, image_size=4, spatial_dims=2)
    with pytest.raises(ConfigError):
        DCELM.solve_readout(torch.eye(2), torch.ones(2, 1), ridge=-1.0)
    with pytest.raises(ConfigError):
        DCELM(1, 2).set_readout(torch.zeros(3, 2))
