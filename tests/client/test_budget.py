"""The node's budget guard derives noise itself and refuses plans over its cap."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.budget import decide
from common.config import NodeConfig, TrainPlan
from common.errors import BudgetExceededError
from common.privacy import AccountantState, planned_epsilon, sample_rate, steps_per_epoch

NODE = NodeConfig(data_dir=Path("."), epsilon_cap=8.0)


def test_derived_noise_spends_at_most_the_target_over_the_whole_plan() -> None:
    plan = TrainPlan(num_rounds=5, local_epochs=2, batch_size=16, target_epsilon=4.0)
    d = decide(plan, NODE, num_patients=160, prior=None)
    steps = 5 * 2 * steps_per_epoch(160, 16)
    assert d.steps_per_round == 2 * steps_per_epoch(160, 16)
    assert d.sample_rate == sample_rate(160, 16)
    assert d.planned_epsilon <= 4.0 + 1e-6
    assert planned_epsilon(noise_multiplier=d.noise_multiplier, sample_rate=d.sample_rate,
                           steps=steps, delta=d.delta) == pytest.approx(d.planned_epsilon)
    assert d.delta < 1 / 160


def test_target_above_cap_refused() -> None:
    with pytest.raises(BudgetExceededError) as info:
        decide(TrainPlan(target_epsilon=9.0), NODE, num_patients=100, prior=None)
    assert "cap of 8" in info.value.safe_reason


def test_extra_rounds_beyond_the_plan_are_refused_once_the_cap_is_reached() -> None:
    plan = TrainPlan(num_rounds=2, batch_size=10, target_epsilon=8.0)
    d = decide(plan, NODE, num_patients=100, prior=None)
    spent = AccountantState().with_event(
        noise_multiplier=d.noise_multiplier, sample_rate=d.sample_rate, steps=2 * d.steps_per_round
    )
    with pytest.raises(BudgetExceededError, match="round"):
        decide(plan, NODE, num_patients=100, prior=spent)


def test_non_private_requires_consent() -> None:
    plan = TrainPlan(private=False)
    with pytest.raises(BudgetExceededError):
        decide(plan, NODE, num_patients=100, prior=None)
    ok = decide(plan, NodeConfig(data_dir=Path("."), allow_non_private=True), num_patients=100, prior=None)
    assert ok.noise_multiplier == 0.0 and ok.planned_epsilon == float("inf")


def test_the_node_owns_delta_a_plan_cannot_loosen_it() -> None:
    # A coordinator asking for delta=0.5 would make weak noise look cheap; the node ignores it.
    loose = TrainPlan(num_rounds=2, batch_size=8, noise_multiplier=0.5, target_delta=0.5)
    with pytest.raises(BudgetExceededError):
        decide(loose, NODE, num_patients=40, prior=None)
    strict = decide(TrainPlan(target_delta=1e-9), NODE, num_patients=40, prior=None)
    assert strict.delta == 1e-9  # a smaller delta is a stronger guarantee: accepted
    default = decide(TrainPlan(target_delta=0.5), NODE, num_patients=40, prior=None)
    assert default.delta < 1 / 400


def test_remaining_rounds_count_later_folds() -> None:
    from client.budget import remaining_rounds

    assert remaining_rounds(TrainPlan(num_rounds=4), 1) == 4
    assert remaining_rounds(TrainPlan(num_rounds=4), 3) == 2
    assert remaining_rounds(TrainPlan(num_rounds=4), 9) == 1  # beyond the plan: this round only
    cv = TrainPlan(num_rounds=4, cv_mode="kfold", num_folds=5, fold=1)
    assert remaining_rounds(cv, 2) == 3 + 3 * 4


def test_a_dataset_with_past_spend_refuses_a_plan_that_alone_would_fit() -> None:
    plan = TrainPlan(num_rounds=2, batch_size=10, target_epsilon=7.5)
    d = decide(plan, NODE, num_patients=100, prior=None)
    past = AccountantState().with_event(
        noise_multiplier=d.noise_multiplier, sample_rate=d.sample_rate, steps=d.steps_per_round
    )
    with pytest.raises(BudgetExceededError) as info:
        decide(plan, NODE, num_patients=100, prior=past, server_round=1)
    assert "already spent" in info.value.safe_reason and "cap of 8" in info.value.safe_reason
    # The same history is this run's own first round: round 2 completes the plan and fits.
    assert decide(plan, NODE, num_patients=100, prior=past, server_round=2).planned_epsilon <= 7.5 + 1e-6
