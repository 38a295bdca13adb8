"""Model zoo on MedMNIST: federated non-private vs federated DP-SGD, per architecture.

Usage::

    python bench/architectures.py [--json] [--quick] [--models cnn,resnet] \
        [--datasets pneumoniamnist] [--splits iid,dirichlet] [--rounds 5] [--epochs 1] \
        [--max-train 1500] [--timing-only] [--modes hooks,ew]

For every classification model of the registry (or ``--models``) that supports the
dataset's dimensionality, every dataset (BreastMNIST, PneumoniaMNIST from
``../shared/data/medmnist``; any other MedMNIST file name, e.g. ``adrenalmnist3d``, works too)
and every site split (IID and label-skewed Dirichlet(0.5), 3 sites by default), two
federations run side by side from the same initial weights:

* **non-DP**: each round every site trains ``--epochs`` local epochs of plain SGD
  (:func:`client.training.train_dp` with ``private=False``) and the server takes the
  sample-weighted FedAvg of the weights;
* **DP**: the same with DP-SGD at each site (Opacus, per-sample clipping ``--max-grad-norm``,
  Poisson sampling); each site's noise multiplier is planned with
  :func:`common.privacy.plan_noise_multiplier` so that its total epsilon over all rounds and
  epochs is at most ``--epsilon`` (default 8) at ``--delta`` (default 1e-5), and its
  accountant history composes across rounds (``prior=``).

Federation is in-process (no Flower runtime): FedAvg is the weighted mean of the site state
dicts, exactly what Flower's FedAvg computes. After the last round the global model is scored
on the official test split: ROC AUC and accuracy (threshold 0.5 on the class-1 softmax).

Cost figures, measured side by side in the same process (the two federations alternate every
round, so load drift hits both): **epoch-time ratio** = median DP / median non-DP process CPU
seconds per local epoch (each ``train_dp`` call, setup included; with one torch thread CPU
time is the compute cost and is robust to other jobs sharing the cores), with the wall-clock
ratio reported beside it (``epoch_wall_ratio``);
**peak-memory ratio** = median DP / non-DP increase of the process's peak RSS (``VmHWM``,
reset through ``/proc/self/clear_refs`` before each call) during a call (with
``--timing-only`` from a second, untimed call per repeat in a forked child, so that every
variant starts from the same heap: the reset returns freed memory to the OS, and the time to
fault it in again is not a cost of training; ``--memory fresh``: what ``--memory-calls``
site-epochs add to a new process of their own, see :func:`_fresh_peak`). ``--timing-only``
skips the federations and measures only these ratios on one site of ``--timing-images``
images (repeats interleaved, medians, after ``--warmup-epochs`` untimed site-epochs of each
variant: the steady state of a node that trains round after round in one process, whose
convolution kernels are built once per batch shape and Poisson batch sizes vary, so the
first epochs of a DP run build more of them; the warm-up's own ratio is reported beside it as
``warmup_time_ratio``), for the model's registered mode and, in the same run,
every stock Opacus mode that applies to it (hooks, functorch, ew, ghost; or ``--modes``); each
row's ``ratios`` puts the registered mode beside the best stock mode (lowest CPU ratio).

torch runs single-threaded by default (``--threads 1``): on the 2-core machine it is both
faster and far more stable for these small models (see ``bench/RESULTS.md``). Training runs on
``--device`` (default: CUDA when available, like the trainer; the report's ``machine`` names
it). On a GPU quote the wall-clock ratio: process CPU time there is kernel launches and
waiting, not the compute.

The default (all models, both datasets, both splits, 3 rounds x 1 epoch on at most 1000
training images) is a smoke sweep of about 3 minutes on 2 cores; accuracy figures worth
quoting need more training, e.g. ``--models cnn --datasets pneumoniamnist --rounds 10
--epochs 2 --max-train 0``. Every model of a run uses its registered Opacus mode
(:attr:`common.models.ModelSpec.grad_sample_mode`); DC-ELM is trained here like the others
(DP-SGD on its readout), not by its closed-form federated solve.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import TensorDataset  # noqa: E402

from client.data.medmnist import load_medmnist, split_sites  # noqa: E402
from client.training import evaluate, select_device, train_dp  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.models import build_model, count_parameters, get_spec, list_models  # noqa: E402
from common.privacy import plan_noise_multiplier, sample_rate, steps_per_epoch  # noqa: E402
from common.shared_data import require_shared_file  # noqa: E402

DATASETS = ("breastmnist", "pneumoniamnist")
"""Default datasets; any MedMNIST file under ``medmnist/`` works, e.g. ``adrenalmnist3d`` (3D
models only)."""
SPLITS = ("iid", "dirichlet")
ALL_MODES = ("hooks", "functorch", "ew", "ghost")

LEARNING_RATES: dict[str, float] = {"default": 0.1, "rnn": 0.2, "dsn": 0.3, "elm": 0.3}
"""SGD learning rate per model family (momentum 0.9), the same for DP and non-DP."""


@dataclass
class Settings:
    """Benchmark settings (one run)."""

    models: list[str]
    datasets: list[str] = field(default_factory=lambda: list(DATASETS))
    splits: list[str] = field(default_factory=lambda: list(SPLITS))
    sites: int = 3
    rounds: int = 3
    epochs: int = 1
    batch_size: int = 64
    max_grad_norm: float = 1.0
    epsilon: float = 8.0
    delta: float = 1e-5
    alpha: float = 0.5
    max_train: int = 0
    threads: int = 1
    seed: int = 0
    timing_only: bool = False
    modes: list[str] = field(default_factory=list)
    timing_images: int = 512
    repeats: int = 3
    warmup_epochs: int = 3
    device: str = ""
    """``cpu`` or ``cuda[:N]``; empty: the trainer's default (CUDA when available)."""
    memory: str = "fork"
    """``--timing-only`` memory method: ``fork`` (one call per repeat in a child forked from
    this process) or ``fresh`` (a new process per variant that makes ``memory_calls`` calls and
    nothing else; see :func:`_fresh_peak`)."""
    memory_calls: int = 10
    noise_floor: bool = False
    """``--timing-only``: also time the direct mode without its Gaussian noise (variant
    ``dp-direct/no-noise``, sigma 0, no privacy): the difference is what the noise draw costs,
    one Gaussian per parameter per step, the part of DP's time no engine can remove."""
    physical_batch_sizes: list[int] = field(default_factory=list)
    """``--timing-only``: also time the direct mode with each Poisson batch run in parts of
    at most this many samples (variants ``dp-direct/parts<N>``; 0: whole batches,
    ``dp-direct/whole``; ``train_dp``'s ``physical_batch_size``, whose default ``dp-direct``
    runs: parts for volumes, whole batches for 2D images)."""


try:
    _LIBC: Any = ctypes.CDLL("libc.so.6")
except OSError:  # not glibc
    _LIBC = None


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> int:
    """Return freed heap to the OS, reset the peak-RSS counter (Linux); return RSS in KiB.

    Without ``malloc_trim`` the allocator keeps memory freed by an earlier call, the next
    call reuses it and its peak RSS increase reads as zero.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux or not permitted: the peak then covers the whole process life
    return _status_kib("VmRSS")


def _added_peak(run: Any) -> float:
    """Peak RSS increase (MiB) of ``run()`` in this process, from a trimmed heap."""
    rss0 = _reset_peak()
    run()
    return max(0, _status_kib("VmHWM") - rss0) / 1024


def _peak_of(run: Any) -> float:
    """Peak RSS increase (MiB) of ``run()``, measured in a forked child where the OS allows.

    Each call then starts from the same heap, the parent's: in one process the allocator's
    state after one variant (the stock modes allocate several times more) changed what the
    next one's peak read, by up to 1.5x on the same call. The child inherits the warm caches
    (oneDNN kernels, the engine's chosen methods), reports its peak through a pipe and exits.
    """
    if not hasattr(os, "fork"):
        return _added_peak(run)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, leave without running the parent's exit code
        code = 1
        try:
            os.close(read)
            os.write(write, repr(_added_peak(run)).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not reported:
        raise RuntimeError(f"the memory-measuring child failed (status {status})")
    return float(reported)


def _fresh_calls(model_name: str, shape: tuple[int, int], state: dict[str, torch.Tensor],
                 tensors: tuple[torch.Tensor, ...], variant: str, kwargs: dict[str, Any], calls: int,
                 threads: int) -> float:
    """In a new process: the peak RSS increase (MiB) of ``calls`` calls of ``variant``."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    model = _build(model_name, shape)
    model.load_state_dict(state)
    data = TensorDataset(*tensors)
    seed = int(kwargs.get("seed") or 0)
    return _added_peak(lambda: [_run_variant(model, data, variant, kwargs | {"seed": seed + k})
                                for k in range(calls)])


def _fresh_peak(model_name: str, shape: tuple[int, int], model: torch.nn.Module, data: TensorDataset,
                variant: str, kwargs: dict[str, Any], calls: int, threads: int) -> float:
    """What ``calls`` site-epochs of ``variant`` add to a new process's peak RSS (MiB).

    A node's process trains one way, round after round. Measured in this process or a child
    forked from it, the added memory depends on the heap that the other variants left (the
    same code read cnn 1.40-2.06 and lstm 1.17-1.70 times plain training, ``bench/RESULTS.md``);
    in a process of its own, first calls, kernels and the fragmentation of its own batch sizes
    included, it does not.
    """
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        future = pool.submit(_fresh_calls, model_name, shape, model.state_dict(),
                             tuple(data.tensors), variant, kwargs, calls, threads)
        return float(future.result())


def _timed_train(
    model: torch.nn.Module, data: TensorDataset, **kwargs: Any
) -> tuple[Any, float, float, float]:
    """Run ``train_dp``; return (result, wall s, process CPU s, peak RSS increase in MiB)."""
    rss0 = _reset_peak()
    c0, t0 = time.process_time(), time.perf_counter()
    result = train_dp(model, data, **kwargs)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    return result, wall, cpu, max(0, _status_kib("VmHWM") - rss0) / 1024


def _fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of state dicts (Flower's FedAvg rule; integer buffers rounded)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
    return out


def _load(name: str, max_train: int, seed: int) -> dict[str, TensorDataset]:
    raw = load_medmnist(require_shared_file(f"medmnist/{name}.npz"))
    out: dict[str, TensorDataset] = {}
    for split, (images, labels) in raw.items():
        if split == "train" and 0 < max_train < len(labels):
            keep = np.sort(np.random.default_rng(seed).permutation(len(labels))[:max_train])
            images, labels = images[keep], labels[keep]
        x = torch.from_numpy(np.ascontiguousarray(images)).float().sub(0.5).div(0.5)
        out[split] = TensorDataset(x, torch.from_numpy(labels).long())
    return out


def _build(model_name: str, shape: tuple[int, int]) -> torch.nn.Module:
    """Build a model for (image_size, spatial_dims)."""
    return build_model(model_name, image_size=shape[0], spatial_dims=shape[1])


def _lr(model_name: str) -> float:
    family = get_spec(model_name).family
    return LEARNING_RATES.get(family, LEARNING_RATES["default"])


def _train_kwargs(s: Settings, model_name: str) -> dict[str, Any]:
    return dict(
        epochs=s.epochs, batch_size=s.batch_size, learning_rate=_lr(model_name),
        max_grad_norm=s.max_grad_norm, delta=s.delta, device=s.device or None,
    )


def _federate(
    s: Settings, model_name: str, sites: list[TensorDataset], test: TensorDataset, shape: tuple[int, int]
) -> dict[str, Any]:
    """Run the non-DP and DP federations side by side; return metrics and cost figures."""
    torch.manual_seed(s.seed)
    init = _build(model_name, shape)
    kwargs = _train_kwargs(s, model_name)
    total_steps = [s.rounds * s.epochs * steps_per_epoch(len(d), s.batch_size) for d in sites]
    sigmas = [
        plan_noise_multiplier(
            target_epsilon=s.epsilon, delta=s.delta,
            sample_rate=sample_rate(len(d), s.batch_size), steps=steps,
        )
        for d, steps in zip(sites, total_steps, strict=True)
    ]
    models = {"non-dp": copy.deepcopy(init), "dp": copy.deepcopy(init)}
    priors: list[Any] = [None] * len(sites)
    times: dict[str, list[float]] = {"non-dp": [], "dp": []}
    cpus: dict[str, list[float]] = {"non-dp": [], "dp": []}
    mems: dict[str, list[float]] = {"non-dp": [], "dp": []}
    epsilons = [0.0] * len(sites)
    losses: dict[str, float] = {}
    for rnd in range(s.rounds):
        for variant in ("non-dp", "dp"):
            private = variant == "dp"
            results = []
            for k, data in enumerate(sites):
                res, secs, cpu, mem = _timed_train(
                    models[variant], data, **kwargs, private=private,
                    noise_multiplier=sigmas[k] if private else 0.0,
                    prior=priors[k] if private else None, seed=s.seed + 1000 * rnd + k,
                )
                times[variant].append(secs / s.epochs)
                cpus[variant].append(cpu / s.epochs)
                mems[variant].append(mem)
                if private:
                    priors[k], epsilons[k] = res.accountant_state, res.epsilon
                results.append(res)
            models[variant].load_state_dict(
                _fedavg([r.state_dict for r in results], [r.num_examples for r in results])
            )
            losses[variant] = float(np.average(
                [r.train_loss for r in results], weights=[r.num_examples for r in results]
            ))
    out: dict[str, Any] = {"noise_multipliers": sigmas, "epsilon": max(epsilons)}
    for variant, model in models.items():
        ev = evaluate(model, test.tensors[0], test.tensors[1], device="cpu")
        out[variant] = {
            "auc": ev.auc, "accuracy": ev.accuracy, "test_loss": ev.loss,
            "last_train_loss": losses[variant],
            "epoch_s": statistics.median(times[variant]),
            "epoch_cpu_s": statistics.median(cpus[variant]),
            "peak_mib": statistics.median(mems[variant]),
        }
    out["epoch_time_ratio"] = out["dp"]["epoch_cpu_s"] / out["non-dp"]["epoch_cpu_s"]
    out["epoch_wall_ratio"] = out["dp"]["epoch_s"] / out["non-dp"]["epoch_s"]
    base_mem = out["non-dp"]["peak_mib"]
    out["peak_memory_ratio"] = out["dp"]["peak_mib"] / base_mem if base_mem > 0 else math.nan
    return out


def _timing(s: Settings, model_name: str, data: TensorDataset, shape: tuple[int, int]) -> dict[str, Any]:
    """DP/non-DP epoch time and peak memory of one site-epoch, for every mode in ``s.modes``."""
    torch.manual_seed(s.seed)
    model = _build(model_name, shape)
    has_dp_loss = callable(getattr(model, "dp_loss", None))
    per_sample = callable(getattr(model, "dp_loss_per_sample", None))
    registered = get_spec(model_name).grad_sample_mode
    modes = s.modes or [registered, *(m for m in ALL_MODES if m != registered)]
    # the trainer refuses these modes for a dp_loss model (see client.training.train_dp)
    modes = [m for m in modes
             if not has_dp_loss or m in ("hooks", "functorch", "direct") or (m == "ghost" and per_sample)]
    kwargs = _train_kwargs(s, model_name) | {"epochs": 1, "seed": s.seed}
    variants = ["non-dp"] + [f"dp-{m}" for m in modes]
    if "direct" in modes and not has_dp_loss:  # parts are for the cross-entropy path
        variants += [f"dp-direct/parts{p}" if p else "dp-direct/whole" for p in s.physical_batch_sizes]
    if "direct" in modes and s.noise_floor:
        variants.append("dp-direct/no-noise")
    raw: dict[str, list[tuple[float, float, float]]] = {v: [] for v in variants}
    errors: dict[str, str] = {}
    warmup_cpu: dict[str, float] = {}
    first = TensorDataset(*(t[: 2 * s.batch_size] for t in data.tensors))
    for variant in variants:  # first calls (lazy imports), then kernels per batch shape
        try:
            _run_variant(model, first, variant, kwargs)
            c0 = time.process_time()
            _run_variant(model, data, variant, kwargs | {"epochs": max(1, s.warmup_epochs)})
            warmup_cpu[variant] = (time.process_time() - c0) / max(1, s.warmup_epochs)
        except Exception as exc:  # noqa: BLE001  (a mode Opacus cannot handle is reported)
            errors[variant] = f"{type(exc).__name__}: {str(exc)[:160]}"
    variants = [v for v in variants if v not in errors]
    # Time and memory from separate passes, all timed ones first: resetting the peak counter
    # hands freed memory back to the OS, and forking a measuring child leaves every page of
    # this process to be faulted in again at its next write (copy-on-write), either of which
    # would be timed too (a node's process keeps its heap between epochs).
    timed: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    for _ in range(s.repeats):
        for variant in variants:
            c0, t0 = time.process_time(), time.perf_counter()
            _run_variant(model, data, variant, kwargs)
            timed[variant].append((time.perf_counter() - t0, time.process_time() - c0))
    fresh = {v: _fresh_peak(model_name, shape, model, data, v, kwargs, s.memory_calls, s.threads)
             for v in variants} if s.memory == "fresh" else {}
    for k in range(s.repeats):
        for variant in variants:
            peak = fresh[variant] if fresh else _peak_of(
                lambda: _run_variant(model, data, variant, kwargs))  # noqa: B023
            raw[variant].append((*timed[variant][k], peak))
    med = {
        v: tuple(statistics.median(x[i] for x in r) for i in range(3))
        for v, r in raw.items() if r
    }
    base_t, base_c, base_m = med.get("non-dp", (math.nan, math.nan, math.nan))
    dp = {v: x for v, x in med.items() if v != "non-dp"}
    stock = {v: x for v, x in dp.items() if v.removeprefix("dp-") in ALL_MODES}
    best = min(stock, key=lambda v: stock[v][1]) if stock else None
    return {
        "registered_mode": registered,
        "best_stock_mode": best and best.removeprefix("dp-"),
        "ratios": {  # the headline figures: registered mode beside Opacus's best stock mode
            label: None if v not in dp else {
                "mode": v.removeprefix("dp-"), "epoch_time_ratio": dp[v][1] / base_c,
                "epoch_wall_ratio": dp[v][0] / base_t,
                "peak_memory_ratio": dp[v][2] / base_m if base_m > 0 else math.nan,
            }
            for label, v in (("registered", f"dp-{registered}"), ("best_stock", best))
        },
        "epoch_s": {v: x[0] for v, x in med.items()},
        "epoch_cpu_s": {v: x[1] for v, x in med.items()},
        "peak_mib": {v: x[2] for v, x in med.items()},
        "epoch_time_ratio": {v: x[1] / base_c for v, x in dp.items()},
        # the warm-up epochs (CPU per epoch): they also build the kernels of each new batch
        # shape, which a node pays in its first rounds only (Poisson batches vary in size)
        "warmup_epoch_cpu_s": warmup_cpu,
        "warmup_time_ratio": {v: warmup_cpu[v] / warmup_cpu["non-dp"] for v in warmup_cpu
                              if v != "non-dp" and "non-dp" in warmup_cpu},
        "epoch_wall_ratio": {v: x[0] / base_t for v, x in dp.items()},
        "peak_memory_ratio": {v: (x[2] / base_m if base_m > 0 else math.nan) for v, x in dp.items()},
        "errors": errors,
        "images": len(data),
    }


def _run_variant(model: torch.nn.Module, data: TensorDataset, variant: str, kwargs: dict[str, Any]) -> None:
    if variant == "non-dp":
        train_dp(model, data, **kwargs, private=False, noise_multiplier=0.0)
    else:
        mode, _, rest = variant.removeprefix("dp-").partition("/")
        quiet = rest == "no-noise"  # the same DP step with sigma 0: the noise draw's cost
        size = None if not rest or quiet else 0 if rest == "whole" else int(rest.removeprefix("parts"))
        train_dp(model, data, **kwargs, noise_multiplier=0.0 if quiet else 1.0,
                 grad_sample_mode=mode, physical_batch_size=size)


def run(s: Settings, log: Any = None) -> dict[str, Any]:
    """Run the benchmark; return a JSON-serialisable report."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(s.threads)
    report: dict[str, Any] = {"benchmark": "architectures", "settings": asdict(s), "results": []}
    t_start = time.perf_counter()
    for ds_name in s.datasets:
        data = _load(ds_name, s.max_train, s.seed)
        train, test = data["train"], data["test"]
        shape = (int(train.tensors[0].shape[-1]), train.tensors[0].ndim - 2)
        labels = train.tensors[1].numpy()
        for model_name in s.models:
            if shape[1] not in get_spec(model_name).spatial_dims:
                continue  # e.g. a 2D-only model on a 3D dataset
            params = count_parameters(_build(model_name, shape))
            if s.timing_only:
                n = min(s.timing_images, len(train))
                subset = TensorDataset(*(t[:n] for t in train.tensors))
                row = {"dataset": ds_name, "model": model_name, "parameters": params,
                       **_timing(s, model_name, subset, shape)}
                report["results"].append(row)
                log(f"{ds_name:15s} {model_name:22s} ratios {row['epoch_time_ratio']} "
                    f"errors {list(row['errors'])}")
                continue
            for split in s.splits:
                parts = split_sites(labels, s.sites, mode=split, alpha=s.alpha, seed=s.seed,  # type: ignore[arg-type]
                                    min_per_site=2 * s.batch_size)
                sites = [TensorDataset(*(t[torch.from_numpy(p)] for t in train.tensors)) for p in parts]
                t0 = time.perf_counter()
                res = _federate(s, model_name, sites, test, shape)
                row = {"dataset": ds_name, "split": split, "model": model_name,
                       "parameters": params, "site_sizes": [len(p) for p in parts],
                       "grad_sample_mode": get_spec(model_name).grad_sample_mode,
                       "learning_rate": _lr(model_name), "seconds": time.perf_counter() - t0,
                       **res}
                report["results"].append(row)
                log(_row_text(row))
    report["seconds"] = time.perf_counter() - t_start
    device = select_device(s.device or None)
    report["machine"] = {"platform": platform.platform(), "python": platform.python_version(),
                         "torch": torch.__version__, "threads": torch.get_num_threads(),
                         "device": str(device) if device.type != "cuda"
                         else f"{device} ({torch.cuda.get_device_name(device)})"}
    return report


def _row_text(r: dict[str, Any]) -> str:
    return (
        f"{r['dataset']:15s} {r['split']:9s} {r['model']:22s} "
        f"non-DP AUC {r['non-dp']['auc']:.3f} ACC {r['non-dp']['accuracy']:.3f} | "
        f"DP(eps {r['epsilon']:.2f}) AUC {r['dp']['auc']:.3f} ACC {r['dp']['accuracy']:.3f} | "
        f"time x{r['epoch_time_ratio']:.2f} (wall x{r['epoch_wall_ratio']:.2f}) mem x{r['peak_memory_ratio']:.2f} "
        f"({r['seconds']:.0f} s)"
    )


def _table(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = []
    if s["timing_only"]:
        lines.append(f"{'dataset':15s} {'model':22s} {'params':>8s} {'non-DP s':>8s}  "
                     "DP/non-DP epoch CPU time [wall] (peak memory)")
        for r in report["results"]:
            ratios = ", ".join(
                f"{v}: {t:.2f} [{r['epoch_wall_ratio'][v]:.2f}] ({r['peak_memory_ratio'][v]:.2f})"
                for v, t in r["epoch_time_ratio"].items()
            )
            base = r["epoch_cpu_s"].get("non-dp", math.nan)
            ratios = f"{base:8.3f}  registered {r['registered_mode']}; " + ratios
            lines.append(f"{r['dataset']:15s} {r['model']:22s} {r['parameters']:8d} {ratios}"
                         + (f"  errors: {r['errors']}" if r["errors"] else ""))
        lines.append(f"(one site-epoch of {s['timing_images']} images, batch {s['batch_size']}, "
                     f"sigma 1.0, medians of {s['repeats']}, torch threads {s['threads']})")
    else:
        lines.append(f"{'dataset':15s} {'split':9s} {'model':22s} {'params':>8s} "
                     f"{'AUC':>6s} {'ACC':>6s} {'DP AUC':>7s} {'DP ACC':>7s} {'eps':>5s} "
                     f"{'time x':>6s} {'wall x':>6s} {'mem x':>6s}")
        for r in report["results"]:
            lines.append(
                f"{r['dataset']:15s} {r['split']:9s} {r['model']:22s} {r['parameters']:8d} "
                f"{r['non-dp']['auc']:6.3f} {r['non-dp']['accuracy']:6.3f} "
                f"{r['dp']['auc']:7.3f} {r['dp']['accuracy']:7.3f} {r['epsilon']:5.2f} "
                f"{r['epoch_time_ratio']:6.2f} {r['epoch_wall_ratio']:6.2f} "
                f"{r['peak_memory_ratio']:6.2f}"
            )
        lines.append(
            f"({s['sites']} sites, {s['rounds']} rounds x {s['epochs']} local epochs, batch "
            f"{s['batch_size']}, clip {s['max_grad_norm']}, target eps {s['epsilon']} at delta "
            f"{s['delta']}, Dirichlet alpha {s['alpha']}, max train {s['max_train'] or 'all'}, "
            f"threads {s['threads']})"
        )
    lines.append(f"total {report['seconds']:.0f} s")
    return "\n".join(lines)


def _classifiers() -> list[str]:
    return [sp.name for sp in list_models() if "classification" in sp.tasks]


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a table (or one JSON object with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="", help="comma-separated registry names (default: all 2D classifiers)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--splits", default=",".join(SPLITS))
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--max-train", type=int, default=1000, help="train images per dataset (0: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timing-only", action="store_true", help="only DP/non-DP cost ratios")
    parser.add_argument("--modes", default="",
                        help="modes for --timing-only (default: registered + every stock Opacus mode)")
    parser.add_argument("--timing-images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=3,
                        help="--timing-only: untimed site-epochs per variant before the timed "
                        "repeats (kernels are built per batch shape; Poisson batches vary)")
    parser.add_argument("--device", default="", help="cpu or cuda[:N] (default: CUDA when available)")
    parser.add_argument("--memory", choices=("fork", "fresh"), default="fork",
                        help="--timing-only memory method: fork (a child forked per call) or fresh "
                        "(a new process per variant making --memory-calls site-epochs)")
    parser.add_argument("--memory-calls", type=int, default=10)
    parser.add_argument("--noise-floor", action="store_true",
                        help="--timing-only: also time direct DP without its noise "
                        "(dp-direct/no-noise, sigma 0): what the Gaussian draw costs")
    parser.add_argument("--physical-batch-sizes", default="",
                        help="--timing-only: also time direct DP with Poisson batches run in parts "
                        "of at most N samples (comma-separated Ns; 0: whole batches)")
    parser.add_argument("--quick", action="store_true", help="cnn+mlp, PneumoniaMNIST IID, 2 rounds, 600 images")
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    args = parser.parse_args(argv)

    def _list(text: str) -> list[str]:
        return [t.strip() for t in text.split(",") if t.strip()]

    s = Settings(
        models=_list(args.models) or _classifiers(), datasets=_list(args.datasets),
        splits=_list(args.splits), sites=args.sites, rounds=args.rounds, epochs=args.epochs,
        batch_size=args.batch_size, max_grad_norm=args.max_grad_norm, epsilon=args.epsilon,
        delta=args.delta, max_train=args.max_train, threads=args.threads, seed=args.seed,
        timing_only=args.timing_only, modes=_list(args.modes),
        timing_images=args.timing_images, repeats=args.repeats, device=args.device,
        warmup_epochs=args.warmup_epochs,
        physical_batch_sizes=[int(p) for p in _list(args.physical_batch_sizes)],
        memory=args.memory, memory_calls=args.memory_calls, noise_floor=args.noise_floor,
    )
    if args.quick:
        s.models = _list(args.models) or ["cnn", "mlp"]
        s.datasets, s.splits, s.rounds, s.max_train = ["pneumoniamnist"], ["iid"], 2, 600
    unknown = [m for m in s.models if m not in {sp.name for sp in list_models()}]
    if unknown:
        parser.error(f"unknown models {unknown}")
    try:
        select_device(s.device or None)
    except ConfigError as exc:
        parser.error(str(exc))
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    report = run(s)
    print(json.dumps(report) if args.json else _table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
