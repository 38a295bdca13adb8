"""Seconds per round of a real deployment on loopback: ``--worker per-message`` vs ``warm``.

Starts a ``flower-superlink`` and N ``vesalius node start --insecure`` nodes (each with its own
port and FLWR_HOME), runs ``vesalius federation run --superlink ... --rounds R``, and reads the
round times from the run's report; repeats for each worker mode, in the same session. Every
process is stopped (by process group) at the end. Run it on a quiet machine only::

    .venv/bin/python bench/round_time.py --sites 3 --rounds 3 --modes per-message warm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listening on {port}")


def _env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}"})
    return env


def run_mode(work: Path, data: Path, *, mode: str, sites: int, rounds: int, model: str,
             extra: list[str]) -> dict[str, object]:
    """One deployment with ``--worker mode``; returns the report's round times."""
    work.mkdir(parents=True)
    procs: list[subprocess.Popen[bytes]] = []
    env = _env(work / "home")
    try:
        link = _free_port()
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(link),
             "--insecure", "--disable-runtime-dependency-installation",
             "--database", str(work / "link.db")],
            env=env, stdout=open(work / "superlink.log", "wb"), stderr=subprocess.STDOUT,
            start_new_session=True))
        _wait_port(link)
        for i in range(1, sites + 1):
            procs.append(subprocess.Popen(
                [str(BIN / "vesalius"), "node", "start", "--data", str(data / f"site-{i}"),
                 "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--site-name", f"site-{i}", "--insecure", "--min-release-count", "1",
                 "--flwr-home", str(work / f"node-{i}"), "--worker", mode,
                 "--ledger-dir", str(work / f"ledger-{i}")],
                env=env, stdout=open(work / f"node-{i}.log", "wb"), stderr=subprocess.STDOUT,
                start_new_session=True))
        if mode == "warm":  # the workers import torch once before serving; not a round cost
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and sum(
                    " ready:" in (work / f"node-{i}.log").read_text(errors="replace")
                    for i in range(1, sites + 1)) < sites:
                time.sleep(0.5)
        started = time.monotonic()
        run = subprocess.run(
            [str(BIN / "vesalius"), "federation", "run", "--superlink", f"127.0.0.1:{link}",
             "--insecure", "--rounds", str(rounds), "--model", model, "--min-nodes", str(sites),
             "--out", str(work / "run"), "--flwr-home", str(work / "operator"), *extra],
            env=env, capture_output=True, text=True, timeout=1800)
        wall = time.monotonic() - started
        (work / "run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            raise RuntimeError(f"{mode}: federation run failed, see {work / 'run.log'}")
        report = json.loads((work / "run" / "report.json").read_text())
        if report.get("status") != "completed":
            raise RuntimeError(f"{mode}: the run did not complete, see {work / 'run.log'}")
        strategy = re.search(r"Strategy execution finished in ([0-9.]+)s", run.stdout + run.stderr)
        tasks = [_task_times((work / f"node-{i}.log").read_text(errors="replace"))
                 for i in range(1, sites + 1)]
        return {"mode": mode, "run_wall_s": round(wall, 1),
                "strategy_s": float(strategy.group(1)) if strategy else None,
                "per_round_s": round(float(strategy.group(1)) / rounds, 2) if strategy else None,
                "node_task_s": tasks}
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _task_times(node_log: str) -> list[float]:
    """Seconds of each task a warm worker served (fork to reply pushed), in order."""
    return [float(t) for t in re.findall(r"task \S+: done in ([0-9.]+) s", node_log)]


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--patients", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--modes", nargs="+", default=["per-message", "warm"])
    parser.add_argument("--work", type=Path, default=None)
    args, extra = parser.parse_known_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vesalius-round-time-"))
    data = work / "data"
    subprocess.run([str(BIN / "vesalius"), "synth", "--sites", str(args.sites), "--patients",
                    str(args.patients), "--out", str(data)], env=_env(work / "synth-home"),
                   check=True, capture_output=True)
    results = [run_mode(work / mode, data, mode=mode, sites=args.sites, rounds=args.rounds,
                        model=args.model, extra=extra) for mode in args.modes]
    print(json.dumps({"load": os.getloadavg(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
