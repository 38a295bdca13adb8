"""Temperature and Platt scaling from summed node statistics against pooled-data optimisers."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.special import expit, logit
from sklearn.metrics import roc_auc_score

from common.errors import ConfigError
from common.stats.calibration import (
    ScoreCalibration,
    apply_calibration,
    calibration_glm_stats,
    fit_calibration,
    fit_temperature,
    temperature_stats_fn,
)
from common.stats.glm import logistic_node_stats, summing_stats_fn


def _sites(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Over-confident, shifted scores: the true log-odds are 0.6 logit(s) - 0.8."""
    rng = np.random.default_rng(seed)
    out = []
    for n in (80, 130, 60):
        z = rng.normal(0.0, 2.5, n)
        out.append((expit(z), rng.random(n) < expit(0.6 * z - 0.8)))
    return out


def _stats_fn(sites: list[tuple[np.ndarray, np.ndarray]]):  # type: ignore[no-untyped-def]
    return summing_stats_fn([lambda b, s=s, y=y: calibration_glm_stats(s, y, b)
                             for s, y in sites])


def _pooled_logits(sites: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    s = np.concatenate([x for x, _ in sites])
    y = np.concatenate([t for _, t in sites]).astype(float)
    return logit(np.clip(s, 1e-12, 1 - 1e-12)), y


def _nll(eta: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_temperature_from_site_sums_equals_scipy_on_pooled_logits(seed: int) -> None:
    # Prepare
    sites = _sites(seed)
    z, y = _pooled_logits(sites)
    ref = minimize(lambda t: _nll(z / t[0], y), x0=[1.0], method="Nelder-Mead",
                   options={"xatol": 1e-10, "fatol": 1e-12})
    # Execute
    fit = fit_temperature(_stats_fn(sites))
    # Assert
    assert fit.names == ["slope"]
    assert 1.0 / fit.coef[0] == pytest.approx(ref.x[0], rel=1e-7)
    assert fit.loglik == pytest.approx(-ref.fun, rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
def test_platt_from_site_sums_equals_scipy_on_pooled_logits(seed: int) -> None:
    # Prepare
    sites = _sites(seed)
    z, y = _pooled_logits(sites)
    ref = minimize(lambda ab: _nll(ab[0] + ab[1] * z, y), x0=[0.0, 1.0], method="BFGS",
                   options={"gtol": 1e-10})
    # Execute
    fit = fit_calibration(_stats_fn(sites), beta0=[0.0, 1.0], intercept_index=None)
    # Assert
    assert fit.coef == pytest.approx(ref.x, abs=1e-6)


def test_temperature_stats_are_the_one_column_glm_without_intercept() -> None:
    # Prepare
    s, y = _sites(3)[0]
    z = logit(np.clip(s, 1e-12, 1 - 1e-12))
    # Execute
    got = temperature_stats_fn(lambda b: calibration_glm_stats(s, y, b))(np.array([0.7]))
    ref = logistic_node_stats(z[:, None], y, [0.7])
    # Assert
    assert got["grad"] == pytest.approx(ref["grad"], rel=1e-12)
    assert got["hessian"] == pytest.approx(ref["hessian"], rel=1e-12)
    assert got["loglik"] == pytest.approx(ref["loglik"], rel=1e-12) and got["n"] == ref["n"]


def test_a_positive_slope_keeps_the_ranking_and_the_auc() -> None:
    # Prepare
    s, y = _sites(4)[1]
    cal = ScoreCalibration("platt", intercept=-1.3, slope=0.4)
    # Execute
    p = cal.apply(s)
    # Assert
    assert roc_auc_score(y, p) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert np.all(np.diff(p[np.argsort(s)]) >= 0)
    assert p == pytest.approx(expit(-1.3 + 0.4 * logit(s)), rel=1e-12)
    assert cal.score_for(float(p[5])) == pytest.approx(float(s[5]), rel=1e-9)
    assert cal.temperature == pytest.approx(2.5)


@pytest.mark.parametrize(
    "kwargs",
    [{"method": "platt", "slope": 0.0}, {"method": "platt", "slope": -1.0},
     {"method": "temperature", "intercept": 0.5}, {"method": "isotonic"},
     {"method": "platt", "intercept": float("nan")}],
)
def test_maps_that_could_reverse_or_are_unknown_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ScoreCalibration(**kwargs)  # type: ignore[arg-type]


def test_identity_map_leaves_scores_unchanged_up_to_the_logit_clip() -> None:
    s = np.array([0.0, 1e-3, 0.5, 0.999, 1.0])
    assert apply_calibration(s, 0.0, 1.0) == pytest.approx(np.clip(s, 1e-12, 1 - 1e-12),
                                                           abs=1e-15)
