"""Epsilon of ledger mechanisms: equals the trainer's, and dp_accounting agrees within tolerance."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

from client.privacy_guard import NodeBudget
from client.training import train_dp
from common.ledger import (
    DEFAULT_TOLERANCE,
    Ledger,
    LedgerEntry,
    Mechanism,
    epsilon_independent,
    epsilon_of,
    epsilons_agree,
    verify_ledger,
)
from common.ledger.accounting import laplace_rdp
from common.models import build_model
from common.privacy import AccountantState, epsilon as accountant_epsilon
from common.privacy.accountant import _RDP_ORDERS, _rdp_per_step
from tests.common.ledger.conftest import DELTA, FP_A

CASES = [
    [Mechanism("subsampled-gaussian", noise_multiplier=1.1, sample_rate=0.01, steps=1000)],
    [Mechanism("subsampled-gaussian", noise_multiplier=0.9, sample_rate=0.05, steps=40),
     Mechanism("subsampled-gaussian", noise_multiplier=1.5, sample_rate=0.02, steps=300)],
    [Mechanism("gaussian", noise_multiplier=3.0, steps=5)],
    [Mechanism("gaussian", noise_multiplier=20.0, steps=1)],
    [Mechanism("laplace", epsilon=0.5, steps=3)],
    [Mechanism("laplace", epsilon=0.05, steps=10),
     Mechanism("subsampled-gaussian", noise_multiplier=1.0, sample_rate=0.1, steps=30),
     Mechanism("gaussian", noise_multiplier=8.0, steps=2)],
]


@pytest.mark.parametrize("mechanisms", CASES)
def test_dp_accounting_agrees_with_opacus_within_the_stated_tolerance(
    mechanisms: list[Mechanism],
) -> None:
    ours = epsilon_of(mechanisms, delta=DELTA)
    theirs = epsilon_independent(mechanisms, delta=DELTA)
    assert 0 < ours < math.inf
    assert epsilons_agree(ours, theirs, tolerance=DEFAULT_TOLERANCE), (ours, theirs)


@pytest.mark.parametrize("mechanisms", CASES)
def test_prv_is_positive_and_not_above_rdp(mechanisms: list[Mechanism]) -> None:
    rdp = epsilon_of(mechanisms, delta=DELTA)
    prv = epsilon_of(mechanisms, delta=DELTA, accountant="prv")
    assert 0 < prv <= rdp + 1e-12


def test_gaussian_curve_is_the_closed_form() -> None:
    # RDP of the Gaussian mechanism: alpha / (2 sigma^2) (Mironov 2017, Proposition 7).
    orders = np.asarray(_RDP_ORDERS)
    assert np.allclose(_rdp_per_step(1.0, 3.0), orders / 18.0, rtol=1e-12)


def test_laplace_curve_is_bounded_by_pure_dp_and_tends_to_it() -> None:
    eps = 0.7
    curve = laplace_rdp(eps, [1.5, 2.0, 10.0, 1000.0, 1e6])
    assert np.all(curve <= eps + 1e-12) and np.all(np.diff(curve) > 0)
    assert curve[-1] == pytest.approx(eps, rel=1e-4)
    # small orders: RDP <= alpha * eps^2 / 2 (Mironov 2017, Proposition 3 via zCDP)
    assert curve[0] <= 1.5 * eps**2 / 2


def test_a_composition_with_no_noise_is_infinite_and_empty_is_zero() -> None:
    open_release = Mechanism("subsampled-gaussian", noise_multiplier=0.0, sample_rate=0.1)
    assert epsilon_of([open_release], delta=DELTA) == math.inf
    assert epsilon_independent([open_release], delta=DELTA) == math.inf
    assert epsilon_of([], delta=DELTA) == 0.0
    assert epsilon_of([Mechanism("gaussian", noise_multiplier=1.0, steps=0)], delta=DELTA) == 0.0


def test_ledger_equals_the_accountant_for_the_same_events() -> None:
    events = AccountantState().with_event(noise_multiplier=1.2, sample_rate=0.03, steps=70)
    events = events.with_event(noise_multiplier=0.8, sample_rate=0.03, steps=10)
    mechs = [Mechanism("subsampled-gaussian", noise_multiplier=e.noise_multiplier,
                       sample_rate=e.sample_rate, steps=e.steps) for e in events.events]
    assert epsilon_of(mechs, delta=DELTA) == pytest.approx(
        accountant_epsilon(events, delta=DELTA), abs=1e-12)


def test_epsilon_in_the_ledger_equals_what_train_dp_reports(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    n = 24
    data = TensorDataset(torch.rand(n, 1, 16, 16, generator=gen),
                         torch.randint(0, 2, (n,), generator=gen))
    model = build_model("cnn", image_size=16)
    ledger = Ledger(tmp_path / "ledger.jsonl")
    budget = NodeBudget(ledger, cap=50.0)
    # prior history of this dataset from an earlier run
    budget.charge(LedgerEntry(FP_A, "run-0", "train", Mechanism(
        "subsampled-gaussian", noise_multiplier=1.3, sample_rate=0.25, steps=8), DELTA, n))
    for rnd in (1, 2):
        result = train_dp(model, data, epochs=1, batch_size=6, learning_rate=0.05,
                          noise_multiplier=1.0, max_grad_norm=1.0, delta=DELTA,
                          prior=budget.prior(FP_A), seed=rnd)
        after = budget.charge(LedgerEntry(
            FP_A, "run-1", "train",
            Mechanism("subsampled-gaussian", noise_multiplier=result.noise_multiplier,
                      sample_rate=result.sample_rate, steps=result.steps),
            result.delta, n, round=rnd, epsilon_reported=result.epsilon,
            params={"max_grad_norm": 1.0, "batch_size": 6, "model": "cnn"},
        ))
        spend = ledger.spend(FP_A)
        assert abs(spend.epsilon_rdp - result.epsilon) < 1e-9
        assert abs(after - result.epsilon) < 1e-9
        assert spend.entries == rnd + 1 and spend.runs == ("run-0", "run-1")
    mechs = [e.mechanism for e in ledger.entries(FP_A)]
    assert epsilons_agree(epsilon_independent(mechs, delta=DELTA), spend.epsilon_rdp)
    report = verify_ledger(ledger.path)  # also checks each epsilon_reported
    assert report.ok, [p.describe() for p in report.problems]


def test_verify_flags_a_reported_epsilon_that_does_not_match_the_history(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.jsonl")
    mech = Mechanism("gaussian", noise_multiplier=4.0, steps=1)
    honest = epsilon_of([mech], delta=DELTA)
    ledger.append(LedgerEntry(FP_A, "r", "query:mean", mech, DELTA, 50, epsilon_reported=honest))
    # the second release reports only its own epsilon, not the dataset's total
    ledger.append(LedgerEntry(FP_A, "r", "query:mean", mech, DELTA, 50, epsilon_reported=honest))
    report = verify_ledger(ledger.path)
    assert [p.index for p in report.problems] == [1]
    assert "reported epsilon" in report.problems[0].reason
