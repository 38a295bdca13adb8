"""Measure what DP-SGD (Opacus) costs over plain SGD: one epoch of the starter CNN on BreastMNIST.

Usage::

    python bench/dp_overhead.py [--repeats 3] [--modes registered,hooks] [--threads 1] [--json]

By default it compares plain SGD with the CNN's **registered** per-sample mode (the one the
trainer uses, :attr:`common.models.ModelSpec.grad_sample_mode`: ``direct``) and, beside it in
the same run, Opacus's "hooks" mode; the headline ratio is the registered mode's. torch runs
single-threaded by default (``--threads 1``), as ``bench/architectures.py`` does: on the small
shared machine that is both faster and far steadier for these small models.

Every measurement runs in a fresh child process (``multiprocessing`` "spawn"), so that the
variants do not share allocator state or memory high-water marks. Within a child: load the
data, build the model, run a short warm-up training call, reset the kernel's peak-RSS counter
(``echo 5 > /proc/self/clear_refs``), then time one full training epoch through
:func:`client.training.train_dp` (``private=False`` for the baseline, so both variants pay
the same model copy and loader setup) and read the peak RSS (``VmHWM``).

What the figures mean:

* ``epoch_s``: wall-clock seconds of one ``train_dp`` call doing one epoch (setup included);
  ``cpu_s`` its process CPU seconds. ``cpu_time_ratio`` (DP / non-DP CPU time, single-threaded)
  is the figure to quote on a shared machine, ``epoch_time_ratio`` the wall-clock one.
* ``peak_rss_mib``: the child's peak resident set size during that epoch (includes the
  ~0.3-0.5 GiB of the Python + torch runtime common to both variants).
* ``peak_increase_mib``: that peak minus the RSS just before the epoch: memory the training
  epoch itself needed. ``peak_memory_ratio`` (DP / non-DP) is computed on this increase,
  ``peak_rss_ratio`` on the absolute peak.

Variants are interleaved over repeats (non-DP, DP-mode-1, ...; then again), and the median of
the repeats is reported, which damps drift from other load on the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

DATASET = "medmnist/breastmnist.npz"
BASELINE = "non-dp"
MODEL = "cnn"
REGISTERED = "registered"
"""Name in ``--modes`` for the model's registered mode (the trainer's default)."""


def resolve_modes(modes: list[str]) -> list[str]:
    """Replace ``registered`` by the CNN's registered mode; drop repeats, keep the order."""
    from common.models import get_spec

    out: list[str] = []
    for mode in modes:
        name = get_spec(MODEL).grad_sample_mode if mode == REGISTERED else mode
        if name not in out:
            out.append(name)
    return out


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure(variant: str, settings: dict[str, Any], queue: Any) -> None:
    """Child process body: warm up, then time one epoch of ``variant``; put a dict on queue."""
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    import numpy as np
    import torch
    from torch.utils.data import Subset, TensorDataset

    from client.training import train_dp
    from common.models import build_model
    from common.privacy import default_delta
    from common.shared_data import require_shared_file

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    with np.load(require_shared_file(DATASET)) as npz:
        images = torch.from_numpy(npz["train_images"]).float().div(255.0).sub(0.5).div(0.5)
        labels = torch.from_numpy(npz["train_labels"]).long().reshape(-1)
    data: Any = TensorDataset(images.unsqueeze(1), labels)
    if settings.get("images"):
        data = Subset(data, range(min(settings["images"], len(data))))
    torch.manual_seed(settings["seed"])
    model = build_model(MODEL, image_size=int(images.shape[-1]))
    private = variant != BASELINE
    kwargs: dict[str, Any] = dict(
        batch_size=settings["batch_size"],
        learning_rate=settings["learning_rate"],
        noise_multiplier=settings["noise_multiplier"],
        max_grad_norm=settings["max_grad_norm"],
        delta=default_delta(len(data)),
        private=private,
        seed=settings["seed"],
    )
    if private:
        kwargs["grad_sample_mode"] = variant.removeprefix("dp-")
    train_dp(model, Subset(data, range(2 * settings["batch_size"])), epochs=1, **kwargs)  # warm-up
    clear_refs = Path("/proc/self/clear_refs")
    clear_refs.write_text("5")  # reset VmHWM to the current RSS
    rss_before = _proc_status_kib("VmRSS")
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = train_dp(model, data, epochs=1, **kwargs)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    peak = _proc_status_kib("VmHWM")
    queue.put(
        {
            "variant": variant,
            "epoch_s": wall,
            "cpu_s": cpu,
            "peak_rss_mib": peak / 1024,
            "peak_increase_mib": (peak - rss_before) / 1024,
            "steps": result.steps,
            "train_loss": result.train_loss,
            "epsilon": result.epsilon if private else None,
            "threads": torch.get_num_threads(),
        }
    )


def _run_child(variant: str, settings: dict[str, Any]) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_measure, args=(variant, settings, queue))
    proc.start()
    out: dict[str, Any] = queue.get(timeout=600)
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"benchmark child for {variant} exited with {proc.exitcode}")
    return out


def _median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def run(settings: dict[str, Any]) -> dict[str, Any]:
    """Run all variants ``settings['repeats']`` times, interleaved; return the summary."""
    variants = [BASELINE] + [f"dp-{m}" for m in settings["modes"]]
    raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for repeat in range(settings["repeats"]):
        for variant in variants:
            res = _run_child(variant, settings)
            raw[variant].append(res)
            print(
                f"  repeat {repeat + 1}/{settings['repeats']} {variant:10s} "
                f"{res['epoch_s']:.3f} s  peak +{res['peak_increase_mib']:.1f} MiB",
                file=sys.stderr,
            )
    summary = {
        v: {
            "epoch_s": _median(runs, "epoch_s"),
            "cpu_s": _median(runs, "cpu_s"),
            "peak_rss_mib": _median(runs, "peak_rss_mib"),
            "peak_increase_mib": _median(runs, "peak_increase_mib"),
            "steps": runs[0]["steps"],
            "epsilon": runs[0]["epsilon"],
            "threads": runs[0]["threads"],
        }
        for v, runs in raw.items()
    }
    base = summary[BASELINE]
    modes = {
        v: {
            "epoch_time_ratio": s["epoch_s"] / base["epoch_s"],
            "cpu_time_ratio": s["cpu_s"] / base["cpu_s"],
            "peak_memory_ratio": s["peak_increase_mib"] / base["peak_increase_mib"],
            "peak_rss_ratio": s["peak_rss_mib"] / base["peak_rss_mib"],
        }
        for v, s in summary.items()
        if v != BASELINE
    }
    primary = f"dp-{settings['modes'][0]}"
    return {
        "benchmark": "dp_overhead",
        "primary_mode": settings["modes"][0],
        "registered_mode": _registered_mode(),
        "epoch_time_ratio": modes[primary]["epoch_time_ratio"],
        "cpu_time_ratio": modes[primary]["cpu_time_ratio"],
        "peak_memory_ratio": modes[primary]["peak_memory_ratio"],
        "peak_rss_ratio": modes[primary]["peak_rss_ratio"],
        "modes": modes,
        "summary": summary,
        "raw": raw,
        "settings": {**settings, "dataset": DATASET, "model": MODEL, "epochs": 1},
        "machine": {
            "platform": platform.platform(),
            "machine": platform.machine(),
            "python": platform.python_version(),
        },
        "peak_memory_measure": (
            "peak RSS (VmHWM) of a fresh child during one epoch minus its RSS just before "
            "the epoch; peak_rss_ratio uses the absolute peak"
        ),
    }


def _registered_mode() -> str:
    from common.models import get_spec

    return get_spec(MODEL).grad_sample_mode


def _table(report: dict[str, Any]) -> str:
    rows = [
        f"{'variant':12s} {'epoch s':>8s} {'cpu s':>7s} {'peak MiB':>9s} "
        f"{'+MiB':>7s} {'cpu x':>6s} {'wall x':>7s} {'mem x':>6s} {'epsilon':>8s}"
    ]
    for v, s in report["summary"].items():
        ratio = report["modes"].get(
            v, {"epoch_time_ratio": 1.0, "cpu_time_ratio": 1.0, "peak_memory_ratio": 1.0})
        eps = "-" if s["epsilon"] is None else f"{s['epsilon']:.3f}"
        rows.append(
            f"{v:12s} {s['epoch_s']:8.3f} {s['cpu_s']:7.3f} {s['peak_rss_mib']:9.1f} "
            f"{s['peak_increase_mib']:7.1f} {ratio['cpu_time_ratio']:6.2f} {ratio['epoch_time_ratio']:7.2f} "
            f"{ratio['peak_memory_ratio']:6.2f} {eps:>8s}"
        )
    st = report["settings"]
    rows.append(
        f"(medians of {st['repeats']} repeats; BreastMNIST train {st.get('images') or 546} images 28x28, batch "
        f"{st['batch_size']}, sigma {st['noise_multiplier']}, C {st['max_grad_norm']}, "
        f"torch threads {report['summary'][BASELINE]['threads']})"
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print the table or one JSON object."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--modes", default=f"{REGISTERED},hooks",
        help="comma-separated per-sample modes, the first is the headline "
             f"({REGISTERED!r}: the model's registered mode)",
    )
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--noise-multiplier", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=0, help="train images used (0: all 546)")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)
    settings = {
        "repeats": args.repeats,
        "modes": resolve_modes([m.strip() for m in args.modes.split(",") if m.strip()]),
        "batch_size": args.batch_size,
        "noise_multiplier": args.noise_multiplier,
        "max_grad_norm": args.max_grad_norm,
        "learning_rate": args.learning_rate,
        "threads": args.threads,
        "seed": args.seed,
        "images": args.images,
    }
    report = run(settings)
    if args.json:
        print(json.dumps(report))
    else:
        print(_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
