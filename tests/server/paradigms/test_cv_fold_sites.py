"""A fold that trains several stages or members reports every site's composed ε, also when it
fails part-way (``server.cv.fold_guard``'s ``sites``, ``cv_ensemble.composed_sites``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.cv import FoldOutcome, fold_guard
from server.paradigms.cv_ensemble import composed_sites


class _Stage:
    """A stand-in for a stage's RunReport: its site rows, and a report to write."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows, self.status, self.reason, self.rounds = rows, "", "", []

    def sites(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.rows]

    def write(self, out_dir: Path) -> None:
        self.written = out_dir


def test_composed_sites_sum_what_each_site_spent_over_the_members() -> None:
    members = [_Stage([{"site": "site-1", "epsilon": 1.0}, {"site": "site-2", "epsilon": 1.0}]),
               _Stage([{"site": "site-1", "epsilon": 1.5}]),  # site-2 did not train
               _Stage([{"site": "site-2", "epsilon": None}, {"site": "site-3", "epsilon": None}])]
    rows = {r["site"]: r["epsilon"] for r in composed_sites(members)}  # type: ignore[arg-type]
    assert rows == {"site-1": pytest.approx(2.5), "site-2": pytest.approx(1.0), "site-3": None}
    # member 0 trained nowhere: the others' sites still count
    rows = {r["site"]: r["epsilon"] for r in composed_sites([_Stage([]), members[1]])}  # type: ignore[list-item]
    assert rows == {"site-1": pytest.approx(1.5)}


def test_a_fold_that_fails_after_its_first_member_reports_that_members_spend(
        tmp_path: Path) -> None:
    # Prepare: member 0 trained at two sites, then the fold fails; the fold report is last
    member = _Stage([{"site": "site-1", "epsilon": 2.0}, {"site": "site-2", "epsilon": 2.0}])
    fold_report = _Stage([])
    outcome = FoldOutcome(fold=0, label="fold-0", run_id="r-fold-0", directory=tmp_path)
    # Execute
    with fold_guard(outcome, [member, fold_report], tmp_path,  # type: ignore[list-item]
                    sites=lambda: composed_sites([member])):  # type: ignore[list-item]
        raise RuntimeError("member 1: no node answered")
    # Assert: failed, said why, and the ε spent so far is on the fold's sites
    assert outcome.status == "failed" and "no node answered" in outcome.reason
    assert {r["site"]: r["epsilon"] for r in outcome.sites} == {"site-1": 2.0, "site-2": 2.0}
    assert fold_report.status == "failed" and fold_report.written == tmp_path
