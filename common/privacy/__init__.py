"""Privacy: accountant wrapper and noise planner (patient-level DP-SGD accounting)."""

from __future__ import annotations

from common.privacy.accountant import (
    AccountantName,
    AccountantState,
    PrivacyEvent,
    default_delta,
    epsilon,
    plan_noise_multiplier,
    planned_epsilon,
    sample_rate,
    steps_per_epoch,
)

__all__ = [
    "AccountantName",
    "AccountantState",
    "PrivacyEvent",
    "default_delta",
    "epsilon",
    "plan_noise_multiplier",
    "planned_epsilon",
    "sample_rate",
    "steps_per_epoch",
]
