"""The node's budget guard: decide the noise for a train plan and refuse plans over the cap.

The coordinator only proposes a :class:`~common.config.TrainPlan`; the node derives the noise
multiplier, the sample rate and the epsilon of the whole plan itself, from its own patient
count and its own cap (node configuration). A plan that would exceed the cap, or a round that
would push the run's accumulated spend past it, is refused before any training step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.config import NodeConfig, TrainPlan
from common.errors import BudgetExceededError
from common.privacy import (
    AccountantState,
    default_delta,
    plan_noise_multiplier,
    planned_epsilon,
    sample_rate,
    steps_per_epoch,
)

log = logging.getLogger(__name__)

_TOLERANCE = 1e-6


@dataclass(frozen=True)
class PrivacyDecision:
    """The node's reading of a plan, for one round.

    Attributes
    ----------
    noise_multiplier : float
        Noise std / clipping norm used in every round of the plan.
    sample_rate : float
        Poisson sampling rate of patients per step.
    steps_per_round : int
        Optimiser steps this round (local epochs x steps per epoch).
    delta : float
        Delta of the patient-level guarantee.
    planned_epsilon : float
        Epsilon of the whole plan (all rounds) at this node.
    """

    noise_multiplier: float
    sample_rate: float
    steps_per_round: int
    delta: float
    planned_epsilon: float


def decide(
    plan: TrainPlan, node: NodeConfig, *, num_patients: int, prior: AccountantState | None
) -> PrivacyDecision:
    """Return the privacy parameters of ``plan`` at this node, or raise if over the cap.

    Raises
    ------
    BudgetExceededError
        The whole plan, or this round on top of the rounds already spent in the run, would
        spend more than ``node.epsilon_cap``; or the plan is not private and the node only
        accepts private training.
    """
    if not plan.private:
        if not node.allow_non_private:
            raise BudgetExceededError(
                "non-private training requested but this node requires DP-SGD",
                safe_reason="refused: this node only trains with differential privacy "
                "(set allow-non-private=true in its node config to permit baselines)",
            )
        # No guarantee at all: epsilon is infinite. delta is only a placeholder for the trainer.
        return PrivacyDecision(0.0, 0.0, 0, default_delta(num_patients), float("inf"))

    q = sample_rate(num_patients, plan.batch_size)
    per_round = plan.local_epochs * steps_per_epoch(num_patients, plan.batch_size)
    total_steps = plan.num_rounds * per_round
    # The node owns delta: a plan may ask for a smaller one, never a larger one (a large delta
    # would make any noise "fit" the epsilon cap).
    node_delta = default_delta(num_patients)
    delta = min(plan.target_delta, node_delta) if plan.target_delta > 0 else node_delta
    if plan.noise_multiplier > 0:
        sigma = plan.noise_multiplier
    else:
        if plan.target_epsilon > node.epsilon_cap + _TOLERANCE:
            raise BudgetExceededError(
                f"plan targets epsilon={plan.target_epsilon} > cap {node.epsilon_cap}",
                safe_reason=(
                    f"refused: the plan targets epsilon={plan.target_epsilon:g}, above this "
                    f"node's cap of {node.epsilon_cap:g}"
                ),
            )
        sigma = plan_noise_multiplier(
            target_epsilon=plan.target_epsilon, delta=delta, sample_rate=q, steps=total_steps
        )
    whole = planned_epsilon(noise_multiplier=sigma, sample_rate=q, steps=total_steps, delta=delta)
    if whole > node.epsilon_cap + _TOLERANCE:
        raise BudgetExceededError(
            f"plan spends epsilon={whole:.3f} > cap {node.epsilon_cap}",
            safe_reason=(
                f"refused: the plan ({plan.num_rounds} rounds x {plan.local_epochs} epochs, "
                f"noise multiplier {sigma:.3f}) would spend epsilon={whole:.2f}, above this "
                f"node's cap of {node.epsilon_cap:g}"
            ),
        )
    after = planned_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=per_round, delta=delta, prior=prior
    )
    if after > node.epsilon_cap + _TOLERANCE:
        raise BudgetExceededError(
            f"round would bring the run to epsilon={after:.3f} > cap {node.epsilon_cap}",
            safe_reason=(
                f"refused: this round would bring the run's spend to epsilon={after:.2f}, "
                f"above this node's cap of {node.epsilon_cap:g}"
            ),
        )
    log.info("plan accepted: sigma=%.4f q=%.4f steps/round=%d epsilon(plan)=%.3f delta=%.2e",
             sigma, q, per_round, whole, delta)
    return PrivacyDecision(sigma, q, per_round, delta, whole)
