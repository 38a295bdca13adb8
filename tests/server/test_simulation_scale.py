"""The simulation's bounded start-up, its processes ended with the driver, and hospitals too
small for a held-out split refused up front (named by site).

Fast tests cover the pieces; the slow ones run ``vesalius federation run`` as a real process
and kill it (SIGKILL and SIGTERM), or give Ray no time to start, then check that no process of
that run is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from common.errors import BudgetExceededError, ConfigError
from server import process_reaper
from server.process_reaper import Reaper, descendants, process_start

BIN = Path(sys.executable).parent


# ----------------------------------------------------------------------------------- fast

def test_descendants_follow_the_whole_tree() -> None:
    parents = {10: 1, 11: 10, 12: 11, 13: 10, 20: 1, 21: 20}
    assert descendants(10, parents) == {11, 12, 13}
    assert descendants(21, parents) == set()


def test_reaper_ends_what_started_inside_its_block() -> None:
    before = subprocess.Popen(["sleep", "30"])
    try:
        with Reaper():
            child = subprocess.Popen(["sleep", "30"])
            time.sleep(3 * process_reaper.POLL_S)  # the watcher has seen it
        assert child.wait(timeout=10) == -signal.SIGTERM
        assert before.poll() is None  # there before the block: not its business
    finally:
        before.kill()
        before.wait()


def test_reap_never_hits_a_recycled_pid() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        start = process_start(child.pid)
        assert start is not None
        process_reaper.reap({child.pid: start + 1}, grace_s=0.1)  # another process's start
        assert child.poll() is None
    finally:
        child.kill()
        child.wait()


def test_ray_start_timeout_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.simulation import RAY_START_TIMEOUT_S, ray_start_timeout

    monkeypatch.delenv("VESALIUS_RAY_START_TIMEOUT_S", raising=False)
    assert ray_start_timeout() == RAY_START_TIMEOUT_S
    monkeypatch.setenv("VESALIUS_RAY_START_TIMEOUT_S", "7.5")
    assert ray_start_timeout() == 7.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv("VESALIUS_RAY_START_TIMEOUT_S", bad)
        with pytest.raises(ConfigError, match="VESALIUS_RAY_START_TIMEOUT_S"):
            ray_start_timeout()


def test_a_ray_start_that_hangs_fails_with_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from server.simulation import RayStarter

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: time.sleep(3))
    starter = RayStarter()
    t0 = time.monotonic()
    with pytest.raises(ConfigError, match=r"did not start within 0.2 s.*VESALIUS_RAY_START"):
        starter.start({}, timeout_s=0.2)
    assert time.monotonic() - t0 < 2
    starter.release()


def test_the_actors_pythonpath_is_restored_after_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from server.simulation import RayStarter

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **_: None)
    monkeypatch.setenv("PYTHONPATH", "/somewhere")
    for _ in range(2):  # two runs in one process: no growth
        starter = RayStarter()
        starter.start({}, timeout_s=5)
        assert os.environ["PYTHONPATH"].endswith("/somewhere")
        assert os.environ["PYTHONPATH"] != "/somewhere"  # the driver's sys.path was added
        starter.release()
        assert os.environ["PYTHONPATH"] == "/somewhere"
    monkeypatch.delenv("PYTHONPATH")
    starter = RayStarter()
    starter.start({}, timeout_s=5)
    starter.release()
    assert "PYTHONPATH" not in os.environ


def test_a_ray_start_that_fails_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    from server.simulation import RayStarter

    def broken(**_: object) -> None:
        raise RuntimeError("no space left in /tmp/ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", broken)
    with pytest.raises(ConfigError, match="could not start: no space left"):
        RayStarter().start({}, timeout_s=5)


def _data(val: int, test: int, train: int = 3) -> SimpleNamespace:
    return SimpleNamespace(train=SimpleNamespace(num_patients=train),
                           val=SimpleNamespace(num_patients=val),
                           test=SimpleNamespace(num_patients=test))


def test_a_hospital_without_a_heldout_split_refuses_the_plan() -> None:
    from client.app import _refuse_without_heldout

    plan = SimpleNamespace(cv_mode="none")
    _refuse_without_heldout(plan, _data(1, 1))  # type: ignore[arg-type]
    with pytest.raises(BudgetExceededError) as info:
        _refuse_without_heldout(plan, _data(1, 0))  # type: ignore[arg-type]
    assert "4 patient(s) are too few for a validation and a test split" in info.value.safe_reason
    # cross-validation makes its own folds: not refused here
    _refuse_without_heldout(SimpleNamespace(cv_mode="kfold"), _data(0, 0))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- slow

def _env(tmp: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(tmp / "flwr"), "VESALIUS_HOME": str(tmp / "home"),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "COLUMNS": "200", **extra})
    return env


def _synth(out: Path, sites: int, patients: int, env: dict[str, str], seed: int = 0) -> None:
    subprocess.run([str(BIN / "vesalius"), "synth", "--out", str(out), "--sites", str(sites),
                    "--patients", str(patients), "--seed", str(seed), "--slices", "1"],
                   env=env, check=True, capture_output=True)


def _session(sid: int) -> dict[int, str]:
    """Living processes of session ``sid`` (and the run's reaper, in its own session)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if fields[0] == "Z":
            continue
        if int(fields[3]) == sid or f"server.process_reaper {sid} " in cmd:
            found[int(entry.name)] = cmd or stat[:stat.rfind(")") + 1]
    return found


def _wait_for(predicate, timeout: float, step: float = 0.5) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def _kill_all(pids: dict[int, str]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _start_run(tmp: Path, env: dict[str, str], rounds: int = 50) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(BIN / "vesalius"), "federation", "run", "--data-root", str(tmp / "data"),
         "--rounds", str(rounds), "--image-size", "16", "--min-release-count", "1",
         "--secure-aggregation", "off", "--ledger-dir", str(tmp / "ledgers"),
         "--out", str(tmp / "out")],
        env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killing_the_driver_leaves_no_process_of_the_run(tmp_path: Path, sig: int) -> None:
    env = _env(tmp_path, VESALIUS_SIMULATION_ENGINE="ray")  # the engine that starts processes
    _synth(tmp_path / "data", 2, 30, env)
    driver = _start_run(tmp_path, env)
    try:
        assert _wait_for(lambda: any("ClientAppActor" in c for c in _session(driver.pid).values()),
                         timeout=240), "the simulation's actors never started"
        seen = _session(driver.pid)
        assert any("raylet" in c for c in seen.values()), seen
        driver.send_signal(sig)
        driver.wait(timeout=60)
        assert _wait_for(lambda: not _session(driver.pid), timeout=30), \
            f"left running after {signal.Signals(sig).name}: {_session(driver.pid)}"
        if sig == signal.SIGTERM:
            assert driver.returncode == 128 + signal.SIGTERM
    finally:
        driver.kill()
        _kill_all(_session(driver.pid))


@pytest.mark.slow
def test_ray_that_does_not_start_in_time_is_a_clear_error(tmp_path: Path) -> None:
    env = _env(tmp_path, VESALIUS_RAY_START_TIMEOUT_S="0.05", VESALIUS_SIMULATION_ENGINE="ray")
    _synth(tmp_path / "data", 2, 30, env)
    driver = _start_run(tmp_path, env, rounds=1)
    try:
        out, _ = driver.communicate(timeout=180)
        text = " ".join(out.decode(errors="replace").split())
        assert driver.returncode != 0
        assert "did not start within 0.05 s" in text, text[-2000:]
        assert _wait_for(lambda: not _session(driver.pid), timeout=30), _session(driver.pid)
    finally:
        driver.kill()
        _kill_all(_session(driver.pid))


@pytest.mark.slow
def test_a_too_small_hospital_is_refused_by_name_and_others_read_their_files_once(
        tmp_path: Path) -> None:
    env = _env(tmp_path)
    data = tmp_path / "data"
    _synth(data, 2, 30, env)
    _synth(tmp_path / "small", 1, 4, env, seed=5)  # 4 patients: no test split
    (tmp_path / "small" / "site-1").rename(data / "site-3")
    driver = _start_run(tmp_path, env, rounds=2)
    out, _ = driver.communicate(timeout=900)
    text = " ".join(out.decode(errors="replace").split())
    doc = json.loads((tmp_path / "out" / "report.json").read_text())
    assert doc["status"] == "completed", (doc.get("reason"), text[-2000:])
    excluded = doc.get("excluded") or []
    assert [e["site"] for e in excluded] == ["site-3"], excluded
    assert "too few for a validation and a test split" in excluded[0]["reason"]
    assert sorted(s["site"] for s in doc["sites"]) == ["site-1", "site-2"]
    assert "node-" not in json.dumps(doc.get("rounds", "")), "a site was named by its node id"
    for site in ("site-1", "site-2"):  # one preprocessed copy per hospital, read once
        cached = list((tmp_path / "ledgers" / site / "split-cache").glob("*.npz"))
        assert len(cached) == 1, cached


def test_many_simulated_hospitals_get_a_round_timeout_that_fits() -> None:
    from common.config import RunConfig
    from server.simulation import SIMULATED_NODE_S, with_simulated_timeout

    config = RunConfig()
    assert with_simulated_timeout(config, 3) is config  # the run's own time-out is enough
    assert with_simulated_timeout(config, 300).round_timeout == 300 * SIMULATED_NODE_S
