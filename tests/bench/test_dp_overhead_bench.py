"""``bench/dp_overhead.py`` (``make bench``) measures the registered mode beside Opacus hooks."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "dp_overhead.py"


@pytest.mark.slow  # three fresh child processes (~50 s on the loaded 2-core machine)
def test_the_registered_mode_comes_first_and_runs_single_threaded(
    shared_file: Callable[[str], Path],
) -> None:
    shared_file("medmnist/breastmnist.npz")
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--repeats", "1", "--images", "128", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["registered_mode"] == "direct" == report["primary_mode"]
    assert set(report["modes"]) == {"dp-direct", "dp-hooks"}
    assert report["epoch_time_ratio"] == report["modes"]["dp-direct"]["epoch_time_ratio"]
    assert report["cpu_time_ratio"] == report["modes"]["dp-direct"]["cpu_time_ratio"]
    assert math.isfinite(report["epoch_time_ratio"]) and report["epoch_time_ratio"] > 0
    assert all(s["threads"] == 1 for s in report["summary"].values())
    assert report["summary"]["dp-direct"]["steps"] >= 1


def test_registered_resolves_to_the_models_mode_once() -> None:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import dp_overhead
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert dp_overhead.resolve_modes(["registered", "hooks", "direct"]) == ["direct", "hooks"]
