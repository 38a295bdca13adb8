"""`bench/paradigms.py`: every comparison module found, rows printed side by side, a failed
comparison reported as a row while the others still run."""

from __future__ import annotations

import importlib
import math
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
paradigms = importlib.import_module("bench.paradigms")
cases = importlib.import_module("bench.paradigm_cases")


def test_every_comparison_module_is_found_and_has_run() -> None:
    names = paradigms.case_names()
    assert {"transfer", "semi_supervised", "augmentation", "ensemble", "mil"} <= set(names)
    for name in names:
        assert callable(importlib.import_module(f"bench.paradigm_cases.{name}").run), name


def test_a_failing_case_is_a_row_and_the_table_shows_ratios(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    broken = types.ModuleType("bench.paradigm_cases.broken")

    def run(work: Path, quick: bool) -> list[dict[str, object]]:
        raise RuntimeError("no data")

    broken.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "bench.paradigm_cases.broken", broken)
    rows = paradigms.run_case("broken", tmp_path, quick=True)
    assert rows == [{"comparison": "broken", "error": "RuntimeError: no data"}]
    paradigms.print_table(rows + [{"comparison": "c", "variant": "v", "metric": "auc",
                                   "federated": 0.6, "pooled": 0.8}])
    out = capsys.readouterr().out
    assert "broken" in out and "failed: RuntimeError: no data" in out
    assert "0.600" in out and "0.800" in out and "0.750" in out  # ratio federated / pooled


def test_num_unwraps_report_metrics() -> None:
    assert cases.num({"value": 0.7, "ci": [0.6, 0.8]}) == 0.7
    assert cases.num(3) == 3.0
    assert math.isnan(cases.num(None)) and math.isnan(cases.num(float("inf")))
