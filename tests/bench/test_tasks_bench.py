"""``bench/tasks.py``: a row's federated DP result beside its pooled non-private baseline."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "tasks.py"

ROW_FIELDS = ("row", "dataset", "task", "model", "samples", "sites", "patients", "rounds",
              "epsilon_max", "metric", "federated_metric", "pooled_metric", "ratio",
              "federated_wall_s", "pooled_wall_s", "in_process", "error")


def _bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_tasks", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.slow
def test_quick_synthetic_row_reports_both_sides_in_json(tmp_path: Path) -> None:
    # Prepare: the cheapest DICOM row, 1 round on 16 patients per hospital
    args = [sys.executable, str(SCRIPT), "--quick", "--only", "synth-regression", "--rounds",
            "1", "--patients", "16", "--workdir", str(tmp_path / "work"), "--json"]
    # Execute
    done = subprocess.run(args, capture_output=True, text=True, cwd=REPO, timeout=400,
                          check=False)
    # Assert
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["machine"]["cpu_count"] >= 1 and report["machine"]["torch_threads"] >= 1
    assert report["machine"]["date"]
    (row,) = report["rows"]
    assert row["error"] is None, row.get("traceback")
    assert all(key in row for key in ROW_FIELDS)
    assert row["row"] == "synth-regression" and row["metric"] == "mae"
    assert row["sites"] == 3 and not row["in_process"]
    for key in ("federated_metric", "pooled_metric", "ratio", "epsilon_max",
                "federated_wall_s", "pooled_wall_s"):
        assert _finite(row[key]), key
    assert 0 < row["epsilon_max"] <= 8.0 + 1e-9
    assert row["federated"]["test_patients"] == row["pooled"]["test_patients"]


def test_a_failing_row_is_recorded_and_the_others_still_run(
        tmp_path: Path, shared_file: Callable[[str], Path]) -> None:
    # Prepare: a row whose source does not exist, then the cheap in-process heart row
    shared_file("heart_disease_uci/processed.va.data")
    bench = _bench()
    broken = bench.replace(bench.ROWS[0], name="no-such-dataset")
    (heart,) = bench.select_rows("heart-ordinal", quick=True, rounds=1)
    # Execute
    report = bench.run([broken, heart], workdir=tmp_path, seed=0, epsilon=8.0, threads=1,
                       log=lambda msg: None)
    # Assert
    failed, ok = report["rows"]
    assert failed["error"] and failed["row"] == "no-such-dataset" and "traceback" in failed
    assert ok["error"] is None and ok["in_process"] and ok["sites"] == 4
    assert _finite(ok["federated_metric"]) and _finite(ok["pooled_metric"])
    assert 0 < ok["epsilon_max"] <= 8.0 + 1e-9
    assert json.loads(json.dumps(bench.json_safe(report)))  # strict JSON with a failed row


def test_unknown_rows_are_refused_and_overrides_apply() -> None:
    bench = _bench()
    with pytest.raises(SystemExit):
        bench.select_rows("no-such-row", quick=False)
    (row,) = bench.select_rows("synth-multiclass", quick=True, rounds=1, patients=10)
    assert row.rounds == 1 and row.patients == 10
    (heart,) = bench.select_rows("heart-ordinal", quick=False, patients=10)
    assert heart.patients == 0  # in-process rows keep their real hospitals
    assert bench.json_safe({"x": float("nan")}) == {"x": None}
