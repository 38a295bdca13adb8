"""bench/federation.py: its pure helpers (growth exponent, process-tree accounting) and a
smoke run of ``--quick``."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.federation import (TreeUsage, _plan_config, growth_exponent, measure_child, scale_setting,
                              settings_for, summarize, tree_snapshot)

REPO = Path(__file__).resolve().parents[2]


def test_growth_exponent_recovers_a_power_law() -> None:
    sites = [10, 30, 100, 300]
    assert growth_exponent(sites, [2.0 * n for n in sites]) == pytest.approx(1.0)
    assert growth_exponent(sites, [0.5 * n ** 1.5 for n in sites]) == pytest.approx(1.5)
    assert growth_exponent(sites, [7.0] * 4) == pytest.approx(0.0)
    assert math.isnan(growth_exponent([10], [3.0]))
    assert math.isnan(growth_exponent([10, 10], [3.0, 4.0]))
    assert growth_exponent([10, 30, 100], [1.0, math.nan, 10.0]) == pytest.approx(1.0)


def test_tree_usage_counts_each_process_once_and_the_peak_of_one_snapshot() -> None:
    usage = TreeUsage()
    usage.add(1.0, {(1, 100): (1.0, 300), (2, 200): (0.5, 100)})
    usage.add(2.0, {(1, 100): (1.5, 200), (2, 200): (0.7, 150), (3, 300): (0.2, 50)})
    usage.add(3.0, {(1, 100): (2.0, 100), (4, 200): (0.1, 10)})  # 2 gone, pid 4 new
    assert usage.cpu_s == pytest.approx(2.0 + 0.7 + 0.2 + 0.1)
    assert usage.peak_bytes == 400
    assert usage.cpu_at(2.5) == pytest.approx(1.5 + 0.7 + 0.2)
    assert usage.cpu_at(0.5) == 0.0


def test_a_recycled_pid_is_another_process() -> None:
    usage = TreeUsage()
    usage.add(1.0, {(7, 100): (3.0, 0)})
    usage.add(2.0, {(7, 999): (0.5, 0)})
    assert usage.cpu_s == pytest.approx(3.5)


def test_the_tree_of_a_real_child_includes_its_children() -> None:
    # some CPU in the child: a bare interpreter start can take under one 10 ms clock tick,
    # and then the sampled CPU reads 0 (a CI run failed so)
    code = ("import subprocess, time; p = subprocess.Popen(['sleep', '2']); "
            "sum(range(3_000_000)); time.sleep(1.5); p.wait()")
    measured = measure_child([sys.executable, "-c", code])
    assert measured["returncode"] == 0
    assert measured["processes_seen"] >= 2
    assert measured["peak_tree_mb"] > 1
    assert measured["cpu_s"] >= measured["cpu_sampled_s"] > 0
    assert tree_snapshot(os.getpid())  # this process at least


def test_settings_and_summary() -> None:
    class Args:
        quick, sites, demo = False, [10, 30], False

    assert [s.name for s in settings_for(Args())] == ["sites-10", "sites-30"]
    Args.sites = None
    assert [s.name for s in settings_for(Args())] == ["demo", "sites-10", "sites-30",
                                                      "sites-100", "sites-300"]
    assert scale_setting(30).rounds == 3
    # --secure-aggregation off: the same settings, named apart, with it off in the run config
    Args.sites, Args.secure_aggregation = [100], "off"
    (off,) = settings_for(Args())
    assert (off.name, off.sites, off.secure_aggregation) == ("sites-100-secagg-off", 100, "off")
    assert _plan_config(off, Path("/tmp/x")).secure_aggregation == "off"
    assert _plan_config(scale_setting(100), Path("/tmp/x")).secure_aggregation == "auto"
    # --engine inprocess ray: each setting on both engines, the Ray one named apart
    Args.secure_aggregation, Args.engine = "auto", ["inprocess", "ray"]
    both = settings_for(Args())
    assert [(s.name, s.engine) for s in both] == [("sites-100", "inprocess"),
                                                  ("sites-100-ray", "ray")]
    rows = [{"setting": {"name": f"sites-{n}", "sites": n},
             "federated": {"wall_s": 4.0 * n, "cpu_s": 2.0 * n, "later_round_wall_s": n,
                           "peak_tree_mb": 100.0}} for n in (10, 100)]
    growth = summarize([{"setting": {"name": "demo", "sites": 3}}, *rows])
    assert growth["hospitals"] == [10, 100]
    assert growth["exponent_wall"] == pytest.approx(1.0)
    assert growth["exponent_memory"] == pytest.approx(0.0)


@pytest.mark.slow
def test_quick_run_measures_both_sides(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "federation.py"), "--quick",
                          "--json", "--work", str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    doc = json.loads(out.stdout)
    assert [r["setting"]["sites"] for r in doc["rows"]] == [2, 4]
    for row in doc["rows"]:
        fed, pooled = row["federated"], row["pooled"]
        assert fed["status"] == "completed", fed["reason"]
        assert len(fed["round_wall_s"]) == row["setting"]["rounds"]
        assert fed["processes_seen"] == 1  # the in-process engine starts no other process
        assert fed["cpu_s"] > pooled["train_cpu_s"] > 0
        assert row["ratios"]["cpu"] > 1
    assert math.isfinite(doc["growth"]["exponent_wall"])
