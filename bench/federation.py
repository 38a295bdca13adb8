"""What the federation costs beyond its training, and how it grows with the number of hospitals.

For each setting, side by side in one run, two child processes of this script:

* **federated**: :func:`server.simulation.run_simulation` (Flower's simulation engine,
  in-process by default or on Ray with ``--engine ray``,
  the real ServerApp and ClientApp, secure aggregation as the CLI sets it) over the
  setting's synthetic DICOM hospitals, ``num_cpus=2``, one torch thread per node;
* **pooled**: the same DP training in one process: every hospital's train split read from
  its DICOM folder (timed apart), then the same rounds of per-site DP-SGD at the same ε and
  FedAvg (:func:`bench.tasks._dp_fedavg`), one torch thread.

The parent samples each child's whole process tree (``/proc``: the child, Ray's GCS, raylet,
agents and actors, the reaper) every 0.5 s: CPU seconds (``utime + stime`` per process; the
child's own total with every reaped descendant from ``wait4`` as well), and the peak of the
tree's summed PSS (proportional set size: shared pages counted once). Per round: the
federated child notes when each round's evaluation ends; the tree's CPU is read at those
instants. The first round carries Ray's start, the actors' imports and the DICOM reads, so
it is reported apart from the later rounds.

Settings: ``demo`` (3 hospitals x 500 patients, 6 rounds, cnn at 32 px, ε = 8: ``make
demo``'s data and model) and ``sites-N`` for N in 10, 30, 100, 300 (40 patients each, one
image per patient, 3 rounds, same model). The growth exponent is the least-squares slope of
log(time) on log(hospitals) over the ``sites-N`` settings (1 = linear).

Run on a quiet machine::

    .venv/bin/python bench/federation.py --json > federation.json          # everything
    .venv/bin/python bench/federation.py --sites 10 30 --json              # a subset
    .venv/bin/python bench/federation.py --quick --json                    # smoke (2, 4 sites)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Seconds between samples of a child's process tree.
SAMPLE_S = 0.5
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class Setting:
    """One federation to measure."""

    name: str
    sites: int
    patients: int
    rounds: int
    images: tuple[int, int] = (1, 1)
    image_size: int = 32
    model: str = "cnn"
    epsilon: float = 8.0
    batch_size: int = 32
    learning_rate: float = 0.05
    seed: int = 0
    #: ``auto`` as the CLI (on at >= 3 hospitals), ``on`` or ``off``.
    secure_aggregation: str = "auto"
    #: The simulation engine: ``inprocess`` (the CLI's default) or ``ray``.
    engine: str = "inprocess"


DEMO = Setting("demo", sites=3, patients=500, rounds=6, images=(2, 4))
SCALE_SITES = (10, 30, 100, 300)
QUICK = (Setting("quick-2", sites=2, patients=30, rounds=2, image_size=16),
         Setting("quick-4", sites=4, patients=30, rounds=2, image_size=16))


def scale_setting(sites: int) -> Setting:
    """The ``sites-N`` setting: N hospitals of 40 patients, one image each, 3 rounds."""
    return Setting(f"sites-{sites}", sites=sites, patients=40, rounds=3)


# --------------------------------------------------------------------------- pure helpers

def growth_exponent(sites: Sequence[float], seconds: Sequence[float]) -> float:
    """Least-squares slope of log(seconds) on log(sites): time grows like sites**slope.

    NaN with fewer than two distinct positive points.
    """
    pts = [(math.log(x), math.log(y)) for x, y in zip(sites, seconds, strict=True)
           if x > 0 and y > 0 and math.isfinite(y)]
    if len({x for x, _ in pts}) < 2:
        return math.nan
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx


@dataclass
class TreeUsage:
    """CPU seconds and memory of a process tree, accumulated from snapshots.

    A snapshot maps ``(pid, start_ticks)`` (a process, never a recycled pid) to its
    ``(cpu_s, pss_bytes)``. A process's CPU is the most it was ever seen with (it only
    grows); the tree's CPU is the sum of those. Memory is the largest sum over one snapshot.
    """

    cpu: dict[tuple[int, int], float] = field(default_factory=dict)
    peak_bytes: int = 0
    timeline: list[tuple[float, float]] = field(default_factory=list)

    def add(self, when: float, snapshot: Mapping[tuple[int, int], tuple[float, int]]) -> None:
        """Fold one snapshot taken at ``when`` (seconds) into the totals."""
        for key, (cpu_s, _) in snapshot.items():
            self.cpu[key] = max(cpu_s, self.cpu.get(key, 0.0))
        self.peak_bytes = max(self.peak_bytes, sum(mem for _, mem in snapshot.values()))
        self.timeline.append((when, self.cpu_s))

    @property
    def cpu_s(self) -> float:
        """CPU seconds of every process seen in the tree."""
        return sum(self.cpu.values())

    def cpu_at(self, when: float) -> float:
        """The tree's CPU seconds at the last snapshot taken at or before ``when``."""
        seen = [cpu for t, cpu in self.timeline if t <= when]
        return seen[-1] if seen else 0.0


def _proc_stat(pid: int) -> tuple[int, int, float] | None:
    """(parent pid, start ticks, CPU seconds) of a living process, else None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2:].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[19]), (int(fields[11]) + int(fields[12])) / _TICK


def _proc_memory(pid: int) -> int:
    """PSS of a process in bytes (RSS where smaps_rollup cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, IndexError, ValueError):
        return 0


def tree_snapshot(root: int) -> dict[tuple[int, int], tuple[float, int]]:
    """``root`` and every process below it, each ``(pid, start) -> (cpu_s, pss_bytes)``.

    The tree is walked through ``/proc/<pid>/task/*/children``
    (:func:`server.process_reaper.descendants`); Ray's reaper is a child of the driver, so
    it is counted; agents re-parented to ``init`` after their parent died are not.
    """
    from server.process_reaper import descendants

    found = {}
    for pid in {root, *descendants(root)}:
        st = _proc_stat(pid)
        if st is not None:
            found[(pid, st[1])] = (st[2], _proc_memory(pid))
    return found


def measure_child(argv: list[str], *, env: Mapping[str, str] | None = None,
                  timeout_s: float = 7200.0) -> dict[str, Any]:
    """Run ``argv`` as a child, sampling its process tree; return wall, CPU and memory.

    ``cpu_s`` is the larger of the sampled tree's CPU and the child's ``wait4`` total (itself
    plus every descendant it reaped): sampling misses a process's last half second, wait4
    misses what was never reaped.
    """
    usage = TreeUsage()
    t0 = time.time()
    proc = subprocess.Popen(argv, env=dict(env) if env is not None else None,
                            stdin=subprocess.DEVNULL)
    done = threading.Event()
    rusage: list[Any] = []

    def wait() -> None:
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        rusage.append(ru)
        done.set()

    waiter = threading.Thread(target=wait, daemon=True)
    waiter.start()
    while not done.wait(SAMPLE_S):
        usage.add(time.time(), tree_snapshot(proc.pid))
        if time.time() - t0 > timeout_s:
            proc.kill()
    wall = time.time() - t0
    ru = rusage[0]
    reaped = ru.ru_utime + ru.ru_stime  # wait4: the child and every descendant it reaped
    return {"returncode": proc.returncode, "wall_s": wall, "start": t0,
            "cpu_s": max(usage.cpu_s, reaped), "cpu_sampled_s": usage.cpu_s,
            "cpu_wait4_s": reaped, "peak_tree_mb": usage.peak_bytes / 2**20,
            "processes_seen": len(usage.cpu), "usage": usage}


# --------------------------------------------------------------------------- child processes

def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"FLWR_HOME": str(work / "flwr"), "VESALIUS_HOME": str(work / "home"),
                "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return env


def _site_dirs(root: Path) -> list[Path]:
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-")),
                  key=lambda p: int(p.name.split("-")[1]))


def _plan_config(setting: Setting, out: Path) -> Any:
    from cli.federation import build_run_config

    return build_run_config(
        rounds=setting.rounds, local_epochs=1, batch_size=setting.batch_size,
        learning_rate=setting.learning_rate, epsilon=setting.epsilon, noise_multiplier=0.0,
        max_grad_norm=1.0, private=True, model=setting.model, image_size=setting.image_size,
        seed=setting.seed, out=out, min_nodes=max(2, (setting.sites * 9) // 10),
        secure_aggregation=setting.secure_aggregation)


def child_federated(setting: Setting, data: Path, work: Path, result: Path) -> None:
    """The federated child: a simulation over the hospitals; round end times to ``result``."""
    import dataclasses

    from common.config import NodeConfig
    from server.simulation import run_simulation

    config = _plan_config(setting, work / "run")
    # Simulated hospitals share two actor processes: a round takes about sites x node time.
    config = dataclasses.replace(config, round_timeout=max(config.round_timeout,
                                                          10.0 * setting.sites))
    nodes = [NodeConfig(data_dir=d, epsilon_cap=setting.epsilon, site_name=d.name,
                        release_histograms=True, min_release_count=1, torch_threads=1,
                        device="cpu", ledger_dir=work / "ledgers" / d.name)
             for d in _site_dirs(data)]
    rounds: dict[int, float] = {}
    t0 = time.time()
    report = run_simulation(config, nodes, num_cpus=2, engine=setting.engine,
                            on_round=lambda entry: rounds.__setitem__(entry.round, time.time()))
    doc = report.to_dict()
    result.write_text(json.dumps({
        "start": t0, "end": time.time(), "round_end": [rounds[r] for r in sorted(rounds)],
        "status": doc.get("status"), "reason": doc.get("reason"),
        "auc": (doc.get("inference") or {}).get("metrics", {}).get("auc"),
        "epsilon_max": max((float(s["epsilon"]) for s in doc.get("sites", [])), default=None),
        "sites_reporting": len(doc.get("sites", [])),
        "excluded": {str(k): v for k, v in (doc.get("excluded") or {}).items()},
    }))


def child_pooled(setting: Setting, data: Path, result: Path) -> None:
    """The pooled child: read every site's splits, then the same DP-SGD rounds in-process."""
    import warnings

    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Secure RNG turned off")
    from bench.tasks import Row, _dp_fedavg
    from client.data import PatientRecordDataset
    from client.data.task_data import load_task_data
    from common.tasks import get_task
    from common.tasks.federated import prepare_for_training, train_losses
    from server.app import initial_model

    c0, t0 = time.process_time(), time.time()
    loaded = [load_task_data(d, task="binary", num_classes=2, samples="image-2d",
                             image_size=setting.image_size, seed=0) for d in _site_dirs(data)]
    sites = [PatientRecordDataset(nd.train) for nd in loaded if nd.val.num_patients
             and nd.test.num_patients]
    c1, t1 = time.process_time(), time.time()
    task = get_task("binary")
    row = Row(name=setting.name, dataset="synth", task="binary", model=setting.model,
              samples="image-2d", source="synth", metric="auc", image_size=setting.image_size,
              patients=setting.patients, rounds=setting.rounds, batch_size=setting.batch_size,
              learning_rate=setting.learning_rate)
    config = _plan_config(setting, Path(tempfile.mkdtemp()))
    model = prepare_for_training(task, initial_model(config)[0])
    trained = _dp_fedavg(model, sites, row, epsilon=setting.epsilon,
                         loss_kwargs=train_losses(task))
    c2, t2 = time.process_time(), time.time()
    result.write_text(json.dumps({
        "read_s": t1 - t0, "read_cpu_s": c1 - c0, "train_s": t2 - t1, "train_cpu_s": c2 - c1,
        "sites_trained": len(sites), "epsilon_max": trained["epsilon_max"]}))


# --------------------------------------------------------------------------- parent

def synthesize(setting: Setting, root: Path) -> float:
    """Write the setting's hospitals under ``root`` (once); return the seconds it took."""
    from client.dicom.synth import synthesize_federation

    if any(root.glob("site-*")):
        return 0.0
    t0 = time.time()
    synthesize_federation(root, n_sites=setting.sites, patients_per_site=setting.patients,
                          images_per_patient=setting.images, seed=setting.seed)
    return time.time() - t0


def _child(kind: str, setting: Setting, data: Path, work: Path) -> tuple[dict[str, Any],
                                                                         dict[str, Any]]:
    if work.exists():  # an earlier run's ledgers would count against this one's budget
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result = work / f"{kind}.json"
    argv = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--setting",
            json.dumps(asdict(setting)), "--data", str(data), "--work", str(work),
            "--result", str(result)]
    measured = measure_child(argv, env=_env(work))
    if measured["returncode"] != 0 or not result.exists():
        raise RuntimeError(f"{kind} child of {setting.name} failed "
                           f"(exit {measured['returncode']}); see its output above")
    return measured, json.loads(result.read_text())


def measure_setting(setting: Setting, work: Path, log: Any) -> dict[str, Any]:
    """One setting: synthesize, then the federated and the pooled child; one result row."""
    data = work / "data"
    synth_s = synthesize(setting, data)
    log(f"{setting.name}: {setting.sites} hospitals x {setting.patients} patients written "
        f"({synth_s:.0f} s); federating ...")
    fed_m, fed = _child("federated", setting, data, work / "federated")
    log(f"{setting.name}: federated {fed_m['wall_s']:.1f} s wall, {fed_m['cpu_s']:.1f} s CPU; "
        "pooled ...")
    pool_m, pool = _child("pooled", setting, data, work / "pooled")
    usage: TreeUsage = fed_m.pop("usage")
    pool_m.pop("usage")
    ends = fed["round_end"]
    marks = [fed_m["start"], *ends]
    walls = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    cpus = [usage.cpu_at(b) - usage.cpu_at(a) for a, b in zip(marks, marks[1:], strict=False)]
    later_wall = sum(walls[1:]) / len(walls[1:]) if len(walls) > 1 else math.nan
    later_cpu = sum(cpus[1:]) / len(cpus[1:]) if len(cpus) > 1 else math.nan
    pooled_round_wall = pool["train_s"] / setting.rounds
    pooled_round_cpu = pool["train_cpu_s"] / setting.rounds
    return {
        "setting": asdict(setting), "synth_s": synth_s,
        "federated": {**fed_m, **{k: fed[k] for k in ("status", "reason", "auc", "epsilon_max",
                                                      "sites_reporting", "excluded")},
                      "round_wall_s": walls, "round_cpu_s": cpus,
                      "first_round_wall_s": walls[0] if walls else math.nan,
                      "later_round_wall_s": later_wall, "later_round_cpu_s": later_cpu,
                      "after_rounds_s": (fed_m["start"] + fed_m["wall_s"] - ends[-1])
                      if ends else math.nan},
        "pooled": {**pool_m, **pool, "round_wall_s": pooled_round_wall,
                   "round_cpu_s": pooled_round_cpu},
        "ratios": {
            "wall": fed_m["wall_s"] / pool["train_s"],
            "cpu": fed_m["cpu_s"] / pool["train_cpu_s"],
            "cpu_with_read": fed_m["cpu_s"] / (pool["train_cpu_s"] + pool["read_cpu_s"]),
            "later_round_wall": later_wall / pooled_round_wall,
            "later_round_cpu": later_cpu / pooled_round_cpu,
            "memory": fed_m["peak_tree_mb"] / pool_m["peak_tree_mb"],
        },
    }


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Growth exponents of the federated times over the settings with equal hospitals."""
    scale = [r for r in rows if r["setting"]["name"].startswith(("sites-", "quick-"))]
    sites = [r["setting"]["sites"] for r in scale]

    def fit(get: Any) -> float:
        return growth_exponent(sites, [get(r) for r in scale])

    return {"hospitals": sites,
            "exponent_wall": fit(lambda r: r["federated"]["wall_s"]),
            "exponent_cpu": fit(lambda r: r["federated"]["cpu_s"]),
            "exponent_later_round_wall": fit(lambda r: r["federated"]["later_round_wall_s"]),
            "exponent_memory": fit(lambda r: r["federated"]["peak_tree_mb"])}


def _machine() -> dict[str, Any]:
    import platform

    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "load_1min": os.getloadavg()[0]}


def settings_for(args: argparse.Namespace) -> list[Setting]:
    """The settings the command line asks for."""
    mode = getattr(args, "secure_aggregation", "auto")
    if args.quick:
        chosen = list(QUICK)
    else:
        chosen = [DEMO] if args.sites is None or args.demo else []
        chosen += [scale_setting(n) for n in (SCALE_SITES if args.sites is None else args.sites)]
    if mode != "auto":
        chosen = [dataclasses.replace(s, name=f"{s.name}-secagg-{mode}", secure_aggregation=mode)
                  for s in chosen]
    engines = getattr(args, "engine", None) or ["inprocess"]
    return [s if engine == "inprocess" else
            dataclasses.replace(s, name=f"{s.name}-{engine}", engine=engine)
            for s in chosen for engine in engines]


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def _f(value: Any, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def print_table(doc: dict[str, Any]) -> None:
    """A short human table to stderr."""
    out = sys.stderr
    print(f"{'setting':<10} {'fed wall':>9} {'fed CPU':>8} {'round1':>7} {'later':>7} "
          f"{'pooled':>7} {'ratio cpu':>9} {'later/pooled':>12} {'peak MB':>8}", file=out)
    for r in doc["rows"]:
        f, p, q = r["federated"], r["pooled"], r["ratios"]
        print(f"{r['setting']['name']:<10} {_f(f['wall_s'], '9.1f')} {_f(f['cpu_s'], '8.1f')} "
              f"{_f(f['first_round_wall_s'], '7.1f')} {_f(f['later_round_wall_s'], '7.2f')} "
              f"{_f(p['train_s'], '7.2f')} {_f(q['cpu'], '9.1f')} "
              f"{_f(q['later_round_wall'], '12.2f')} {_f(f['peak_tree_mb'], '8.0f')}", file=out)
    s = doc["growth"]
    print(f"growth exponent over {s['hospitals']} hospitals: wall "
          f"{_f(s['exponent_wall'], '.2f')}, CPU {_f(s['exponent_cpu'], '.2f')}, later round "
          f"{_f(s['exponent_later_round_wall'], '.2f')}, memory "
          f"{_f(s['exponent_memory'], '.2f')}", file=out)


def main(argv: list[str] | None = None) -> int:
    """Command line; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 and 4 tiny hospitals")
    parser.add_argument("--sites", type=int, nargs="+", default=None,
                        help=f"hospital counts to measure (default {SCALE_SITES} and the demo)")
    parser.add_argument("--demo", action="store_true", help="with --sites: the demo setting too")
    parser.add_argument("--secure-aggregation", choices=("auto", "on", "off"), default="auto",
                        help="the runs' secure aggregation (default auto, as the CLI: on at >= 3 "
                        "hospitals)")
    parser.add_argument("--engine", nargs="+", choices=("inprocess", "ray"),
                        default=["inprocess"], help="simulation engine(s); with two, each "
                        "setting runs on both, side by side (default: inprocess, as the CLI)")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: temp)")
    parser.add_argument("--child", choices=("federated", "pooled"), help=argparse.SUPPRESS)
    parser.add_argument("--setting", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        raw = json.loads(args.setting)
        setting = Setting(**{**raw, "images": tuple(raw["images"])})
        if args.child == "federated":
            child_federated(setting, args.data, args.work, args.result)
        else:
            child_pooled(setting, args.data, args.result)
        return 0
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-federation-"))

    def log(text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    rows = []
    for setting in settings_for(args):
        rows.append(measure_setting(setting, work / setting.name, log))
    doc = _clean({"machine": _machine(), "rows": rows, "growth": summarize(rows)})
    if args.json:
        print(json.dumps(doc, indent=2), flush=True)
    print_table(doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
