"""Round time beyond the nodes' own compute: Flower's stock transport vs Vesalius's, side by side.

Issue 15's acceptance: for 3 real nodes (a ``flower-superlink`` and 3 ``vesalius node start
--insecure`` processes on loopback, ``vesalius federation run --superlink``) and for 10
simulated nodes (Flower's simulation runtime, in a child process), with the small CNN and
DenseNet, with and without secure aggregation, the seconds a round costs beyond the nodes'
own work, in two settings:

``stock``
    ``VESALIUS_TRANSPORT=stock`` for every process: models travel as one Flower ``Array`` per
    tensor and replies are polled as before (:mod:`server.progress`); real nodes run
    ``--worker per-message`` (a fresh ClientApp process per message, Flower's own way).
``ours``
    Packed models (:mod:`common.packing`), adaptive polling (:mod:`server.transport`) and,
    for real nodes, ``--worker warm`` (:mod:`client.warm_worker`), when the node CLI has it.

How a round is measured: the coordinator's grid appends every phase's span to
``VESALIUS_TIMINGS_FILE`` (:class:`server.transport.TimedGrid`) and every node appends the
span of its own work on each message (:func:`client.transport.transport_mod`: the handler
and the inner mods; not the ClientApp process start, which is overhead). Round ``r`` is the
window from the start of its training phase to the start of round ``r + 1``'s (the last
round: to the end of its last phase); its compute is the length of the union of the node
spans inside the window (nodes work in parallel); beyond = window - compute. Round 1 (cold
start, the split cache being filled) is shown but left out of the median.

Run it on a quiet machine only (``uptime`` load < 2.5); every process it starts is stopped
by process group at the end::

    .venv/bin/python bench/deployment.py --json --quick
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
MODES = ("stock", "ours")
MODELS = ("cnn", "densenet")
SECAGG = ("off", "on")


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


def _env(home: Path, mode: str, timings: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                "VESALIUS_TRANSPORT": "stock" if mode == "stock" else "",
                "VESALIUS_TIMINGS_FILE": str(timings),
                "VESALIUS_HOME": str(home / "vesalius")})
    return env


# --- measuring --------------------------------------------------------------------------------

def _union(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for lo, hi in sorted(spans):
        if hi <= end:
            continue
        total += hi - max(lo, end)
        end = hi
    return total


def round_overheads(rows: list[dict[str, Any]]) -> list[dict[str, float]]:
    """Per round: window, node compute (union of spans) and the time beyond it (seconds)."""
    server = [r for r in rows if r.get("type") == "server"]
    nodes = [(float(r["start"]), float(r["end"])) for r in rows if r.get("type") != "server"]
    starts: dict[int, float] = {}
    for r in server:
        if r["phase"] == "train" and int(r["round"]) not in starts:
            starts[int(r["round"])] = float(r["start"])
    rounds = sorted(starts)
    out = []
    for i, rnd in enumerate(rounds):
        lo = starts[rnd]
        if i + 1 < len(rounds):
            hi = starts[rounds[i + 1]]
        else:  # the last round ends with its last training or validation phase
            hi = max((float(r["end"]) for r in server if int(r["round"]) == rnd
                      and r["phase"] in ("train", "evaluate")), default=lo)
        clipped = [(max(a, lo), min(b, hi)) for a, b in nodes if b > lo and a < hi]
        compute = _union(clipped)
        out.append({"round": rnd, "window_s": round(hi - lo, 3),
                    "compute_s": round(compute, 3), "beyond_s": round(hi - lo - compute, 3),
                    "full_cycle": i + 1 < len(rounds)})
    return out


def _summary(rounds: list[dict[str, Any]]) -> float | None:
    warm = [r for r in rounds if r["round"] >= 2 and r["full_cycle"]]
    warm = warm or [r for r in rounds if r["round"] >= 2] or rounds
    return round(statistics.median(r["beyond_s"] for r in warm), 3) if warm else None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


# --- 3 real nodes -----------------------------------------------------------------------------

def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        try:  # children left in the group (superexec, clientapp)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _worker_modes() -> bool:
    """Whether ``vesalius node start`` has ``--worker`` (the warm worker)."""
    shown = subprocess.run([str(BIN / "vesalius"), "node", "start", "--help"],
                           capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    return "--worker" in shown.stdout


def deployed(work: Path, data: Path, *, mode: str, model: str, secagg: str, sites: int,
             rounds: int, node_args: list[str]) -> dict[str, Any]:
    """One deployment on loopback; the round overheads from the timing files."""
    work.mkdir(parents=True)
    if "--worker" not in node_args and _worker_modes():
        node_args = [*node_args, "--worker", "per-message" if mode == "stock" else "warm"]
    timings = work / "timings.jsonl"
    env = _env(work / "home", mode, timings)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        link = _free_port()
        procs.append(subprocess.Popen(
            [str(BIN / "flower-superlink"), "--host", "127.0.0.1", "--port", str(link),
             "--insecure", "--disable-runtime-dependency-installation",
             "--database", str(work / "link.db")],
            env=env, stdout=open(work / "superlink.log", "wb"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True))
        _wait_port(link)
        for i in range(1, sites + 1):
            procs.append(subprocess.Popen(
                [str(BIN / "vesalius"), "node", "start", "--data", str(data / f"site-{i}"),
                 "--superlink", f"127.0.0.1:{link}", "--port", str(_free_port()),
                 "--site-name", f"site-{i}", "--insecure", "--min-release-count", "1",
                 "--flwr-home", str(work / f"node-{i}"),
                 "--ledger-dir", str(work / f"ledger-{i}"), *node_args],
                env=env, stdout=open(work / f"node-{i}.log", "wb"),  # noqa: SIM115
                stderr=subprocess.STDOUT, start_new_session=True))
        started = time.monotonic()
        run = subprocess.run(
            [str(BIN / "vesalius"), "federation", "run", "--superlink", f"127.0.0.1:{link}",
             "--insecure", "--rounds", str(rounds), "--model", model, "--min-nodes", str(sites),
             "--secure-aggregation", secagg, "--out", str(work / "run"),
             "--flwr-home", str(work / "operator")],
            env=env, capture_output=True, text=True, timeout=3600)
        wall = time.monotonic() - started
        (work / "run.log").write_text(run.stdout + run.stderr)
        if run.returncode != 0:
            return {"error": f"federation run exited {run.returncode} (see {work / 'run.log'})"}
    finally:
        _stop(procs)
    per_round = round_overheads(_read_rows(timings))
    return {"beyond_compute_s": _summary(per_round), "wall_s": round(wall, 1),
            "node_args": node_args, "rounds": per_round}


# --- 10 simulated nodes -----------------------------------------------------------------------

def simulated(work: Path, data: Path, *, mode: str, model: str, secagg: str, sites: int,
              rounds: int) -> dict[str, Any]:
    """One simulation in a child process (its own Ray); the round overheads."""
    work.mkdir(parents=True)
    timings = work / "timings.jsonl"
    env = _env(work / "home", mode, timings)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--simulate-one",
           json.dumps({"data": str(data), "out": str(work / "run"), "model": model,
                       "secagg": secagg, "sites": sites, "rounds": rounds})]
    proc = subprocess.Popen(cmd, env=env, stdout=open(work / "sim.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=3600)
    finally:
        _stop([proc])
    if code != 0:
        return {"error": f"simulation exited {code} (see {work / 'sim.log'})"}
    per_round = round_overheads(_read_rows(timings))
    return {"beyond_compute_s": _summary(per_round), "rounds": per_round}


def _simulate_one(spec: dict[str, Any]) -> None:
    from common.config import NodeConfig, RunConfig, TrainPlan
    from server.simulation import run_simulation

    data, out = Path(spec["data"]), Path(spec["out"])
    plan = TrainPlan(num_rounds=int(spec["rounds"]), model=spec["model"],
                     run_id=f"bench-{out.parent.name}")
    config = RunConfig(plan=plan, out_dir=str(out), min_nodes=int(spec["sites"]),
                       secure_aggregation=spec["secagg"])
    nodes = [NodeConfig(data_dir=data / f"site-{i}", site_name=f"site-{i}", device="cpu",
                        min_release_count=1, ledger_dir=out.parent / "ledgers" / f"site-{i}")
             for i in range(1, int(spec["sites"]) + 1)]
    report = run_simulation(config, nodes)
    if report.status != "completed":
        raise SystemExit(f"run {report.status}: {report.reason}")


# --- the table --------------------------------------------------------------------------------

def _synth(data: Path, sites: int, patients: int) -> None:
    subprocess.run([str(BIN / "vesalius"), "synth", "--sites", str(sites), "--patients",
                    str(patients), "--out", str(data)],
                   env=_env(data.parent / "synth-home", "ours", data.parent / "synth.jsonl"),
                   check=True, capture_output=True)


def _secagg_available() -> bool:
    from common.config import RunConfig

    return "secure_aggregation" in RunConfig.__dataclass_fields__


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true",
                        help="3 rounds, 24 patients per site (one warm full round per cell)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--patients", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--secagg", nargs="+", default=list(SECAGG), choices=SECAGG)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--no-simulation", action="store_true")
    parser.add_argument("--no-deployment", action="store_true")
    parser.add_argument("--node-args", default="",
                        help="extra `vesalius node start` arguments, e.g. '--worker warm'")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--simulate-one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _exit_on_term)  # `finally` then stops every child group
    if args.simulate_one:
        _simulate_one(json.loads(args.simulate_one))
        return
    rounds = args.rounds or (3 if args.quick else 5)
    patients = args.patients or (24 if args.quick else 60)
    work = args.work or Path(tempfile.mkdtemp(prefix="vesalius-deployment-"))
    secaggs = args.secagg if _secagg_available() else ["off"]
    results: dict[str, Any] = {"rounds": rounds, "patients_per_site": patients,
                               "load_before": os.getloadavg(), "work": str(work),
                               "secure_aggregation": ("available" if _secagg_available()
                                                      else "n/a (not yet available)"),
                               "deployment_3_nodes": {}, "simulation_10_nodes": {}}
    if not args.no_deployment:
        _synth(work / "data3" / "data", 3, patients)
    if not args.no_simulation:
        _synth(work / "data10" / "data", 10, patients)
    for model in args.models:
        for secagg in secaggs:
            for mode in args.modes:
                cell = f"{model}/secagg-{secagg}/{mode}"
                if not args.no_deployment:
                    results["deployment_3_nodes"][cell] = deployed(
                        work / "deploy" / cell.replace("/", "-"), work / "data3" / "data",
                        mode=mode, model=model, secagg=secagg, sites=3, rounds=rounds,
                        node_args=args.node_args.split())
                    _progress(args, "3 real", cell, results["deployment_3_nodes"][cell])
                if not args.no_simulation:
                    results["simulation_10_nodes"][cell] = simulated(
                        work / "sim" / cell.replace("/", "-"), work / "data10" / "data",
                        mode=mode, model=model, secagg=secagg, sites=10, rounds=rounds)
                    _progress(args, "10 simulated", cell, results["simulation_10_nodes"][cell])
    results["load_after"] = os.getloadavg()
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        _print_table(results)


def _progress(args: argparse.Namespace, where: str, cell: str, result: dict[str, Any]) -> None:
    shown = result.get("beyond_compute_s", result.get("error"))
    print(f"{where} {cell}: beyond compute {shown}", file=sys.stderr, flush=True)


def _print_table(results: dict[str, Any]) -> None:
    print(f"seconds per round beyond the nodes' compute (median of warm rounds; "
          f"{results['rounds']} rounds; secure aggregation {results['secure_aggregation']})")
    for title, key in (("3 real nodes", "deployment_3_nodes"),
                       ("10 simulated nodes", "simulation_10_nodes")):
        cells = results[key]
        if not cells:
            continue
        print(f"\n{title}:  {'model':<10} {'secagg':<7} {'stock':>10} {'ours':>10}")
        for model in MODELS:
            for secagg in SECAGG:
                pair = [cells.get(f"{model}/secagg-{secagg}/{m}") for m in MODES]
                if pair == [None, None]:
                    continue
                shown = [str(p.get("beyond_compute_s", "error")) if p else "-" for p in pair]
                print(f"{'':<20}{model:<10} {secagg:<7} {shown[0]:>10} {shown[1]:>10}")
    if results["secure_aggregation"] != "available":
        print("secure aggregation: n/a (not yet available)")


if __name__ == "__main__":
    main()
