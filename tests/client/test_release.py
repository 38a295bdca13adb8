"""Release rules: cohort minimum and small-cell suppression (exact), Gaussian noise charged to
the node's ledger (noised), refusal over the cap before anything is computed."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from client.privacy_guard import NodeBudget
from client.release import ReleaseGuard, Statistic, file_fingerprint
from common.config import NodeConfig
from common.errors import BudgetExceededError, ConfigError, DataError
from common.ledger.accounting import epsilon_of
from common.ledger.mechanism import Mechanism
from common.privacy import default_delta

STATS = [
    Statistic("n", 1.0, integer=True),
    Statistic("cells", 1.0, (4,), small_cells=True, integer=True),
    Statistic("sums", 1.0, (4,), linked_to="cells"),
]
VALUES = {"n": 40, "cells": np.array([0, 3, 12, 25]), "sums": np.array([0.0, 1.5, 6.0, 20.0])}


def _node(tmp_path: Path, **kw: Any) -> NodeConfig:
    return NodeConfig(data_dir=tmp_path, ledger_dir=tmp_path / "ledger", **kw)


def _guard(node: NodeConfig, n: int = 40, stats: list[Statistic] = STATS) -> ReleaseGuard:
    return ReleaseGuard(node=node, query="demo", statistics=stats, num_patients=n,
                        fingerprint="fp-demo", run_id="run-1")


def test_exact_release_suppresses_small_cells_and_linked_sums(tmp_path: Path) -> None:
    guard = _guard(_node(tmp_path, min_release_count=10))
    guard.authorize()
    out = guard.release(VALUES)
    assert not out.noised and out.epsilon_after is None
    assert out.values["cells"] == [0, 0, 12, 25]  # 3 is in 1..9: released as 0
    assert out.values["sums"] == [0.0, 0.0, 6.0, 20.0]  # its sum goes with it
    assert out.values["n"] == 40 and out.suppressed_cells == 1
    # Exact: on the record at level "exact" (no DP guarantee), never counted against the cap.
    from common.ledger import Ledger

    ledger = Ledger(tmp_path / "ledger" / "ledger.jsonl")
    [record] = ledger.read().records
    assert record.entry.level == "exact" and record.entry.release.startswith("query:")
    assert record.entry.mechanism.noise_multiplier == 0.0
    assert record.entry.params["suppressed-cells"] == 1
    assert ledger.spend("fp-demo").entries == 0  # patient level untouched


def test_exact_release_below_cohort_minimum_is_refused(tmp_path: Path) -> None:
    guard = _guard(_node(tmp_path, min_release_count=50), n=40)
    with pytest.raises(DataError) as info:
        guard.authorize()
    assert "minimum release count" in info.value.safe_reason


def test_threshold_zero_or_one_releases_exact_values(tmp_path: Path) -> None:
    for threshold in (0, 1):
        guard = _guard(_node(tmp_path, min_release_count=threshold))
        guard.authorize()
        out = guard.release(VALUES)
        assert out.values["cells"] == [0, 3, 12, 25] and out.suppressed_cells == 0


def test_noised_release_charges_ledger_with_composed_gaussian(tmp_path: Path) -> None:
    node = _node(tmp_path, stats_noise_multiplier=2.0, epsilon_cap=50.0)
    guard = _guard(node)
    assert guard.mechanism_multiplier == pytest.approx(2.0 / math.sqrt(3))
    guard.authorize()
    out = guard.release(VALUES)
    assert out.noised and out.suppressed_cells == 0
    expected = epsilon_of([Mechanism(kind="gaussian", noise_multiplier=2.0 / math.sqrt(3))],
                          delta=default_delta(40))
    assert out.epsilon_after == pytest.approx(expected, rel=1e-9)
    entries = NodeBudget.for_node(node).ledger.entries("fp-demo", level="patient")
    assert [e.release for e in entries] == ["query:demo"]
    assert entries[0].dataset_size == 40 and entries[0].run_id == "run-1"
    # Noised counts are rounded, non-negative integers (post-processing).
    cells = out.values["cells"]
    assert isinstance(cells, list) and all(isinstance(v, int) and v >= 0 for v in cells)


def test_noise_scale_follows_sensitivity_and_is_unseeded(tmp_path: Path) -> None:
    node = _node(tmp_path, stats_noise_multiplier=1.5, epsilon_cap=1e9)
    stats = [Statistic("x", 4.0, (4000,))]
    draws = []
    for _ in range(2):
        guard = _guard(node, stats=stats)
        guard.authorize()
        draws.append(np.asarray(guard.release({"x": np.zeros(4000)}).values["x"]))
    assert np.std(draws[0]) == pytest.approx(1.5 * 4.0, rel=0.05)
    assert not np.array_equal(draws[0], draws[1])  # OS entropy, not a fixed seed


def test_over_cap_is_refused_before_computing_and_nothing_is_charged(tmp_path: Path) -> None:
    node = _node(tmp_path, stats_noise_multiplier=0.05, epsilon_cap=1.0)
    guard = _guard(node)
    with pytest.raises(BudgetExceededError) as info:
        guard.authorize()
    assert "cap" in info.value.safe_reason
    assert NodeBudget.for_node(node).ledger.entries("fp-demo", level="patient") == []
    with pytest.raises(ConfigError):
        guard.release(VALUES)  # not authorised: nothing may leave


def test_undeclared_or_misshapen_statistics_are_refused(tmp_path: Path) -> None:
    guard = _guard(_node(tmp_path, min_release_count=1))
    guard.authorize()
    with pytest.raises(ConfigError):
        guard.release({**VALUES, "extra": 1})
    with pytest.raises(ConfigError):
        guard.release({**VALUES, "cells": np.arange(40)})  # a per-patient-length vector
    with pytest.raises(DataError):
        guard.release({**VALUES, "sums": np.array([0.0, math.nan, 1.0, 2.0])})


def test_file_fingerprint_changes_with_content(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("a")
    first = file_fingerprint(path)
    path.write_text("b")
    assert first != file_fingerprint(path) and first.startswith("tabular-")
