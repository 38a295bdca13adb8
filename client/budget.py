"""The node's budget guard: decide the noise for a train plan and refuse plans over the cap.

The coordinator only proposes a :class:`~common.config.TrainPlan`; the node derives the noise
multiplier, the sample rate and the epsilon of the whole plan itself, from its own patient
count and its own cap (node configuration). The cap is **per dataset**, over every run: the
``prior`` passed in is the dataset's whole history from the node's privacy ledger
(:mod:`common.ledger`), and a round is refused, before any training step, when that history
plus the rest of the plan (this round, the plan's later rounds and, in cross-validation, its
later folds) would exceed the cap.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from common.config import NodeConfig, TrainPlan
from common.errors import BudgetExceededError
from common.privacy import (
    AccountantState,
    default_delta,
    epsilon,
    plan_noise_multiplier,
    planned_epsilon,
    sample_rate,
    steps_per_epoch,
)
from common.privacy.display import epsilon_text

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


def remaining_rounds(plan: TrainPlan, server_round: int) -> int:
    """Training rounds left in the plan from ``server_round`` on, later CV folds included."""
    this_fold = max(plan.num_rounds - server_round + 1, 1)
    later_folds = plan.num_folds - plan.fold - 1 if plan.cv_mode != "none" else 0
    return this_fold + later_folds * plan.num_rounds


def decide(
    plan: TrainPlan,
    node: NodeConfig,
    *,
    num_patients: int,
    prior: AccountantState | None,
    server_round: int = 1,
) -> PrivacyDecision:
    """Return the privacy parameters of ``plan`` at this node, or raise if over the cap.

    Parameters
    ----------
    plan : TrainPlan
        The coordinator's proposal.
    node : NodeConfig
        The node's own settings (cap, consent to non-private training).
    num_patients : int
        Patients in the training data of this round.
    prior : AccountantState or None
        Everything this dataset has already spent (all runs, folds and rounds), from the
        node's ledger.
    server_round : int
        The round about to be trained (1-based), to count the rounds left in the plan.

    Raises
    ------
    BudgetExceededError
        The whole plan alone, or the dataset's past spend plus the rest of the plan, would
        exceed ``node.epsilon_cap``; or the plan is not private and the node only accepts
        private training.
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
    folds = plan.num_folds if plan.cv_mode != "none" else 1
    total_steps = plan.num_rounds * per_round * folds
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
                f"refused: the plan ({plan.num_rounds} rounds x {plan.local_epochs} epochs"
                f"{f' x {folds} folds' if folds > 1 else ''}, noise multiplier {sigma:.3f}) "
                f"would spend epsilon={whole:.2f}, above this node's cap of "
                f"{node.epsilon_cap:g}"
            ),
        )
    left = remaining_rounds(plan, server_round)
    after = planned_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=left * per_round, delta=delta, prior=prior
    )
    if after > node.epsilon_cap + _TOLERANCE:
        past = epsilon(prior, delta=delta) if prior is not None and prior.total_steps else 0.0
        raise BudgetExceededError(
            f"dataset spent epsilon={past:.3f}; {left} more rounds would reach {after:.3f} "
            f"> cap {node.epsilon_cap}",
            safe_reason=(
                f"refused: this dataset has already spent epsilon={epsilon_text(past, 2)} "
                f"(all runs, from the node's privacy ledger); the remaining {left} round(s) of "
                f"this plan would bring it to epsilon={epsilon_text(after, 2)}, above this "
                f"node's cap of "
                f"{node.epsilon_cap:g}. Nothing was trained."
            ),
        )
    log.info("plan accepted: sigma=%.4f q=%.4f steps/round=%d epsilon(plan)=%.3f delta=%.2e",
             sigma, q, per_round, whole, delta)
    return PrivacyDecision(sigma, q, per_round, delta, whole)
