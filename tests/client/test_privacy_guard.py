"""NodeBudget: the cap covers every past patient-level entry of a dataset, across runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.privacy_guard import NodeBudget
from common.config import NodeConfig
from common.errors import BudgetExceededError, PrivacyConfigError
from common.ledger import Ledger, LedgerEntry, Mechanism, epsilon_of
from common.privacy.display import epsilon_shown

DELTA = 1e-5
FP = "f" * 64
OTHER = "0" * 64
ROUND = Mechanism("subsampled-gaussian", noise_multiplier=1.0, sample_rate=0.05, steps=20)


def _entry(fp: str = FP, *, run: str = "run-1", rnd: int = 1, level: str = "patient",
           mechanism: Mechanism = ROUND) -> LedgerEntry:
    return LedgerEntry(fp, run, "train", mechanism, DELTA, 100, round=rnd, level=level)


@pytest.fixture
def budget(tmp_path: Path) -> NodeBudget:
    return NodeBudget(Ledger(tmp_path / "ledger" / "ledger.jsonl"), cap=3.0)


def test_a_second_run_over_the_cap_is_refused_before_anything_is_appended(
    budget: NodeBudget,
) -> None:
    one_round = epsilon_of([ROUND], delta=DELTA)
    two_rounds = epsilon_of([ROUND, ROUND], delta=DELTA)
    assert two_rounds < 3.0 < epsilon_of([ROUND] * 3, delta=DELTA)  # the test's premise
    assert budget.charge(_entry(rnd=1)) == pytest.approx(one_round)
    assert budget.charge(_entry(rnd=2)) == pytest.approx(two_rounds)
    before = budget.ledger.path.read_bytes()

    with pytest.raises(BudgetExceededError) as err:  # run 2 plans two more rounds
        budget.check(FP, [ROUND, ROUND], delta=DELTA)
    reason = err.value.safe_reason
    # shown rounded up, as on every screen (common.privacy.display)
    assert f"spent epsilon={epsilon_shown(two_rounds, 2):.2f} of its cap 3" in reason
    assert f"bring it to {epsilon_shown(epsilon_of([ROUND] * 4, delta=DELTA), 2):.2f}" in reason
    assert FP not in reason

    with pytest.raises(BudgetExceededError):
        budget.charge(_entry(run="run-2", rnd=1))
    assert budget.ledger.path.read_bytes() == before  # nothing appended


def test_entries_of_another_dataset_do_not_count(budget: NodeBudget) -> None:
    budget.charge(_entry(OTHER, rnd=1))
    budget.charge(_entry(OTHER, rnd=2))
    assert budget.check(FP, [ROUND, ROUND], delta=DELTA) == pytest.approx(
        epsilon_of([ROUND, ROUND], delta=DELTA))
    assert budget.spent(FP).entries == 0


def test_hospital_level_entries_are_not_counted_against_the_patient_cap(
    budget: NodeBudget,
) -> None:
    client_level = Mechanism("subsampled-gaussian", noise_multiplier=0.5, sample_rate=1.0,
                             steps=10)  # far above the cap on its own
    hospital_eps = budget.charge(_entry(level="hospital", mechanism=client_level))
    assert hospital_eps > 3.0
    assert budget.check(FP, [ROUND], delta=DELTA) == pytest.approx(
        epsilon_of([ROUND], delta=DELTA))
    assert budget.spent(FP).entries == 0
    assert budget.ledger.spend(FP, level="hospital").epsilon_rdp == pytest.approx(hospital_eps)


def test_past_entries_with_a_smaller_delta_are_composed_at_it(tmp_path: Path) -> None:
    budget = NodeBudget(Ledger(tmp_path / "ledger.jsonl"), cap=10.0)
    budget.ledger.append(LedgerEntry(FP, "r", "train", ROUND, 1e-7, 100))
    assert epsilon_of([ROUND, ROUND], delta=1e-7) > epsilon_of([ROUND, ROUND], delta=1e-5)
    assert budget.check(FP, [ROUND], delta=1e-5) == pytest.approx(
        epsilon_of([ROUND, ROUND], delta=1e-7))


def test_for_node_uses_the_node_ledger_path_and_cap(tmp_path: Path) -> None:
    node = NodeConfig(data_dir=tmp_path, epsilon_cap=4.5, ledger_dir=tmp_path / "l")
    budget = NodeBudget.for_node(node)
    assert budget.cap == 4.5 and budget.ledger.path == tmp_path / "l" / "ledger.jsonl"


def test_prior_feeds_the_trainer_with_the_dataset_history(budget: NodeBudget) -> None:
    budget.charge(_entry(rnd=1))
    budget.charge(_entry(OTHER, rnd=1))
    prior = budget.prior(FP)
    assert prior.to_history() == [(1.0, 0.05, 20)]


def test_an_invalid_cap_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PrivacyConfigError):
        NodeBudget(Ledger(tmp_path / "x.jsonl"), cap=0.0)


def test_spent_without_prv_skips_it(budget: NodeBudget) -> None:
    budget.charge(_entry())
    quick, full = budget.spent(FP, prv=False), budget.spent(FP)
    assert quick.epsilon_rdp == full.epsilon_rdp
    assert quick.epsilon_prv != quick.epsilon_prv  # NaN
    assert 0 < full.epsilon_prv <= full.epsilon_rdp
