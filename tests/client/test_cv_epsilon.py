"""A node's ε for a cross-validation: every fold's training of that cross-validation on the
dataset, composed (a patient trains in several folds), not the fold's own."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from client.app import _cv_history, _privacy_metrics, _run_history
from client.privacy_guard import NodeBudget
from common import messages as k
from common.config import NodeConfig, TrainPlan, fold_run_id
from common.ledger import Ledger, LedgerEntry, Mechanism, epsilon_of

DELTA = 1e-5
FP = "f" * 64
ROUND = Mechanism("subsampled-gaussian", noise_multiplier=1.0, sample_rate=0.05, steps=20)


def _spend(budget: NodeBudget, run: str, fold: int | None, rnd: int, fp: str = FP) -> None:
    budget.charge(LedgerEntry(fp, run, "train", ROUND, DELTA, 100, round=rnd, fold=fold))


def test_a_fold_reports_the_cross_validation_so_far_and_its_own_run(tmp_path: Path) -> None:
    budget = NodeBudget(Ledger(tmp_path / "ledger.jsonl"), cap=100.0)
    for fold in (0, 1):  # this cross-validation's folds 0 and 1, two rounds each
        for rnd in (1, 2):
            _spend(budget, fold_run_id("cv-7", fold), fold, rnd)
    _spend(budget, fold_run_id("cv-7", 0) + "-member-1", 0, 1)  # a fold's sub-run (ensemble)
    _spend(budget, fold_run_id("cv-7", 10), 10, 1)  # fold 10 of it (its id is not fold 1's)
    _spend(budget, "run-1", None, 1)  # another run on the same dataset
    _spend(budget, fold_run_id("cv-8", 0), 0, 1)  # another cross-validation
    _spend(budget, fold_run_id("cv-7", 0), 0, 1, fp="0" * 64)  # another dataset
    plan = replace(TrainPlan(), cv_mode="kfold", num_folds=3, fold=1, run_id=fold_run_id("cv-7", 1))

    cv = _cv_history(budget, FP, plan)
    run = _run_history(None, budget, FP, plan)  # type: ignore[arg-type]

    # folds 0 and 1 (two rounds each), fold 0's member and fold 10 are this cross-validation's
    assert cv is not None and cv.total_steps == 6 * ROUND.steps
    assert run.total_steps == 2 * ROUND.steps
    metrics = _privacy_metrics(NodeConfig(data_dir=tmp_path), run, DELTA, 0.0, with_prv=False, cv=cv)
    assert metrics[k.EPSILON_CV] == pytest.approx(epsilon_of([ROUND] * 6, delta=DELTA))
    assert metrics[k.EPSILON] == pytest.approx(epsilon_of([ROUND] * 2, delta=DELTA))
    assert metrics[k.EPSILON_CV] > metrics[k.EPSILON]


def test_outside_a_cross_validation_there_is_no_cv_epsilon(tmp_path: Path) -> None:
    budget = NodeBudget(Ledger(tmp_path / "ledger.jsonl"), cap=100.0)
    plan = replace(TrainPlan(), run_id="run-1")
    assert _cv_history(budget, FP, plan) is None
    member = replace(plan, cv_mode="kfold", num_folds=2, run_id=fold_run_id("cv-1", 1) + "-member-0",
                     fold=1)
    assert _cv_history(budget, FP, member) is not None  # a fold's sub-run is in the CV
    assert _cv_history(None, FP, replace(plan, cv_mode="kfold", num_folds=2,
                                         run_id=fold_run_id("cv-1", 0))) is None
    assert k.EPSILON_CV not in _privacy_metrics(NodeConfig(data_dir=tmp_path), _run_history(None, budget, FP, plan),  # type: ignore[arg-type]
                                                DELTA, 0.0, with_prv=False)
