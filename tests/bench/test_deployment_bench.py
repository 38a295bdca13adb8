"""``bench/deployment.py``: how a round's time beyond the nodes' compute is computed from the
coordinator's phase spans and the nodes' compute spans (the runs themselves are heavy and are
not started here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "deployment.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_deployment", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _server(phase: str, rnd: int, start: float, end: float) -> dict[str, object]:
    return {"type": "server", "phase": phase, "round": rnd, "start": start, "end": end}


def _node(start: float, end: float, kind: str = "train") -> dict[str, object]:
    return {"type": kind, "start": start, "end": end}


def test_parallel_node_work_counts_once_and_the_rest_is_overhead(bench: ModuleType) -> None:
    rows = [
        _server("train", 1, 0.0, 5.0), _server("evaluate", 1, 5.5, 7.0),
        _server("train", 2, 10.0, 13.0), _server("evaluate", 2, 13.2, 14.0),
        # round 1: three nodes train in parallel (union 1..4 = 3 s), evaluate 5.6..6.6 (1 s)
        _node(1.0, 3.0), _node(2.0, 4.0), _node(1.5, 2.5), _node(5.6, 6.6, "evaluate"),
        # round 2: 10.5..12.5 and 13.3..13.8
        _node(10.5, 12.5), _node(11.0, 12.0), _node(13.3, 13.8, "evaluate"),
    ]
    rounds = bench.round_overheads(rows)
    assert [r["round"] for r in rounds] == [1, 2]
    first, last = rounds
    assert first == {"round": 1, "window_s": 10.0, "compute_s": 4.0, "beyond_s": 6.0,
                     "full_cycle": True}
    assert last["window_s"] == 4.0 and last["compute_s"] == 2.5 and last["beyond_s"] == 1.5
    assert not last["full_cycle"]


def test_the_summary_leaves_out_the_cold_first_round(bench: ModuleType) -> None:
    rounds = [{"round": 1, "beyond_s": 9.0, "full_cycle": True},
              {"round": 2, "beyond_s": 1.0, "full_cycle": True},
              {"round": 3, "beyond_s": 2.0, "full_cycle": True},
              {"round": 4, "beyond_s": 7.0, "full_cycle": False}]
    assert bench._summary(rounds) == 1.5


def test_node_work_outside_the_window_is_not_compute(bench: ModuleType) -> None:
    rows = [_server("train", 1, 0.0, 2.0), _node(-5.0, 1.0), _node(1.5, 9.0)]
    (only,) = bench.round_overheads(rows)
    assert only["window_s"] == 2.0 and only["compute_s"] == 1.5
