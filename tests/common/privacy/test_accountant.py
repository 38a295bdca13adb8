"""Accountant state, epsilon golden values and the noise planner."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from common.errors import PrivacyConfigError
from common.privacy import (
    AccountantState,
    default_delta,
    epsilon,
    plan_noise_multiplier,
    planned_epsilon,
    sample_rate,
    steps_per_epoch,
)

EVENTS = [(1.1, 0.01, 500), (0.8, 0.02, 120), (2.0, 0.05, 40)]
DELTA = 1e-5


def _state(events: list[tuple[float, float, int]]) -> AccountantState:
    state = AccountantState()
    for nm, q, s in events:
        state = state.with_event(noise_multiplier=nm, sample_rate=q, steps=s)
    return state


def test_empty_history_spends_nothing() -> None:
    assert epsilon(AccountantState(), delta=DELTA) == 0.0
    assert epsilon(AccountantState(), delta=DELTA, accountant="prv") == 0.0


def test_rdp_epsilon_matches_opacus_stepped_accountant() -> None:
    # Prepare: an independent accountant stepped one step at a time
    acc = RDPAccountant()
    for nm, q, s in EVENTS:
        for _ in range(s):
            acc.step(noise_multiplier=nm, sample_rate=q)
    # Execute / Assert
    assert epsilon(_state(EVENTS), delta=DELTA) == pytest.approx(
        acc.get_epsilon(delta=DELTA), rel=0, abs=1e-9
    )


def test_rdp_golden_value() -> None:
    # Opacus 1.6.0 RDPAccountant, sigma=1.0, q=0.1, 100 steps, delta=1e-5
    state = _state([(1.0, 0.1, 100)])
    assert epsilon(state, delta=1e-5) == pytest.approx(7.899255002434629, rel=1e-9)


def test_prv_path_matches_opacus_and_is_tighter() -> None:
    acc = PRVAccountant()
    acc.history = [(nm, q, s) for nm, q, s in EVENTS]
    eps_prv = epsilon(_state(EVENTS), delta=DELTA, accountant="prv")
    assert eps_prv == pytest.approx(acc.get_epsilon(delta=DELTA), rel=1e-6)
    assert 0 < eps_prv < epsilon(_state(EVENTS), delta=DELTA)


@pytest.mark.parametrize(
    ("events", "delta"),
    [
        ([(0.87, 32 / 350, 66)], 1e-3),  # the demo's mechanism
        ([(1.1, 0.01, 400), (0.7, 0.05, 30)], 1e-5),  # two events, small delta
        ([(2.0, 1.0, 3)], 1e-6),  # full batch
    ],
)
def test_prv_epsilon_is_exactly_opacus_with_the_domain_from_cached_rdp_curves(
    events: list[tuple[float, float, int]], delta: float,
) -> None:
    """The PRV path sizes its domain from the cached RDP curves: same number as stock."""
    stock = PRVAccountant()
    stock.history = list(events)
    assert epsilon(_state(events), delta=delta, accountant="prv") == stock.get_epsilon(
        delta=delta
    )


def test_zero_noise_is_infinite_epsilon() -> None:
    assert math.isinf(epsilon(_state([(0.0, 0.1, 1)]), delta=DELTA))


def test_record_round_trip() -> None:
    state = _state(EVENTS)
    record = state.to_record()
    assert set(record) == {"noise-multiplier", "sample-rate", "steps"}
    assert record["steps"] == [500, 120, 40]
    assert all(isinstance(v, int) for v in record["steps"])
    assert AccountantState.from_record(record) == state
    assert AccountantState.from_record(AccountantState().to_record()) == AccountantState()


def test_record_fits_a_flower_config_record() -> None:
    from flwr.app import ConfigRecord

    state = _state(EVENTS)
    config = ConfigRecord(state.to_record())  # type: ignore[arg-type]
    assert AccountantState.from_record(dict(config)) == state


@pytest.mark.parametrize(
    "record",
    [
        {"noise-multiplier": [1.0], "sample-rate": [0.1]},
        {"noise-multiplier": [1.0], "sample-rate": [0.1, 0.2], "steps": [1]},
        {"noise-multiplier": [-1.0], "sample-rate": [0.1], "steps": [1]},
        {"noise-multiplier": [1.0], "sample-rate": [1.5], "steps": [1]},
        {"noise-multiplier": [1.0], "sample-rate": [0.1], "steps": [1.5]},
        {"noise-multiplier": ["x"], "sample-rate": [0.1], "steps": [1]},
        {"noise-multiplier": [1.0], "sample-rate": [0.1], "steps": [None]},
    ],
)
def test_corrupt_records_raise(record: dict[str, list[float]]) -> None:
    with pytest.raises(PrivacyConfigError):
        AccountantState.from_record(record)


def test_with_event_is_immutable_and_skips_zero_steps() -> None:
    base = _state(EVENTS[:1])
    longer = base.with_event(noise_multiplier=1.0, sample_rate=0.1, steps=3)
    assert len(base.events) == 1 and len(longer.events) == 2
    assert base.with_event(noise_multiplier=1.0, sample_rate=0.1, steps=0) is base
    assert longer.total_steps == 503


@pytest.mark.parametrize(
    ("target", "q", "steps"), [(8.0, 0.1, 100), (1.0, 0.01, 1000), (3.0, 64 / 546, 9)]
)
def test_plan_spends_close_to_but_within_target(target: float, q: float, steps: int) -> None:
    sigma = plan_noise_multiplier(target_epsilon=target, delta=DELTA, sample_rate=q, steps=steps)
    spent = planned_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=DELTA)
    assert spent <= target
    assert spent >= 0.98 * target


def test_plan_with_prior_respects_the_total_target() -> None:
    prior = _state([(1.0, 0.1, 100)])  # about 7.9
    sigma = plan_noise_multiplier(
        target_epsilon=12.0, delta=DELTA, sample_rate=0.1, steps=100, prior=prior
    )
    total = planned_epsilon(
        noise_multiplier=sigma, sample_rate=0.1, steps=100, delta=DELTA, prior=prior
    )
    assert 0.98 * 12.0 <= total <= 12.0
    # the prior forces more noise than a fresh plan for the same target
    assert sigma > plan_noise_multiplier(
        target_epsilon=12.0, delta=DELTA, sample_rate=0.1, steps=100
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"target_epsilon": 0.0},
        {"target_epsilon": -1.0},
        {"target_epsilon": math.inf},
        {"delta": 0.0},
        {"delta": 1.0},
        {"sample_rate": 0.0},
        {"sample_rate": 1.5},
        {"steps": 0},
    ],
)
def test_plan_rejects_bad_input(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {
        "target_epsilon": 8.0, "delta": DELTA, "sample_rate": 0.1, "steps": 10
    }
    args.update(kwargs)
    with pytest.raises(PrivacyConfigError):
        plan_noise_multiplier(**args)  # type: ignore[arg-type]


def test_plan_rejects_exhausted_budget() -> None:
    prior = _state([(1.0, 0.1, 100)])  # about 7.9
    with pytest.raises(PrivacyConfigError, match="already reaches"):
        plan_noise_multiplier(
            target_epsilon=5.0, delta=DELTA, sample_rate=0.1, steps=10, prior=prior
        )


@pytest.mark.parametrize("n", [1, 10, 546, 10_000, 10**6])
def test_default_delta_well_below_one_over_n(n: int) -> None:
    delta = default_delta(n)
    assert 0 < delta < 1 / n
    assert delta <= 1e-5


def test_default_delta_rejects_empty() -> None:
    with pytest.raises(PrivacyConfigError):
        default_delta(0)


@pytest.mark.parametrize(("n", "b", "steps"), [(546, 64, 9), (64, 64, 1), (65, 64, 2), (10, 100, 1)])
def test_steps_and_rate_match_opacus_dp_data_loader(n: int, b: int, steps: int) -> None:
    import torch
    from opacus.data_loader import DPDataLoader
    from torch.utils.data import DataLoader, TensorDataset

    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=b)
    dp_loader = DPDataLoader.from_data_loader(loader)
    assert steps_per_epoch(n, b) == steps == len(dp_loader)
    assert sample_rate(n, b) == dp_loader.sample_rate
