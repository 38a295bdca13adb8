"""``bench/architectures.py`` runs end to end on real MedMNIST data and reports what it ran on."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "architectures.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300, check=False)


@pytest.mark.slow  # five modes, one child process each way (~50 s on the loaded machine)
def test_timing_only_reports_ratios_and_the_device(shared_file: Callable[[str], Path]) -> None:
    shared_file("medmnist/breastmnist.npz")
    done = _run("--timing-only", "--models", "cnn", "--datasets", "breastmnist",
                "--timing-images", "96", "--repeats", "1", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["machine"]["device"] == "cpu" and report["settings"]["device"] == "cpu"
    (row,) = report["results"]
    assert row["model"] == "cnn" and row["images"] == 96 and not row["errors"]
    ratio = row["epoch_time_ratio"]["dp-direct"]  # the registered mode
    assert math.isfinite(ratio) and ratio > 0.5
    warm = row["warmup_time_ratio"]["dp-direct"]  # the untimed warm-up epochs, reported too
    assert math.isfinite(warm) and warm > 0.5 and row["warmup_epoch_cpu_s"]["non-dp"] > 0
    # beside it, in the same run, every stock Opacus mode and the best of them
    assert {"dp-hooks", "dp-functorch", "dp-ew", "dp-ghost"} <= set(row["epoch_time_ratio"])
    assert row["registered_mode"] == "direct" and row["ratios"]["registered"]["mode"] == "direct"
    best = row["best_stock_mode"]
    assert best in ("hooks", "functorch", "ew", "ghost")
    assert row["ratios"]["best_stock"]["epoch_time_ratio"] == min(
        row["epoch_time_ratio"][f"dp-{m}"] for m in ("hooks", "functorch", "ew", "ghost"))
    assert math.isfinite(row["ratios"]["registered"]["peak_memory_ratio"])


@pytest.mark.slow
def test_physical_batch_sizes_add_direct_variants_run_in_parts(shared_file: Callable[[str], Path]) -> None:
    shared_file("medmnist/breastmnist.npz")
    done = _run("--timing-only", "--models", "cnn", "--datasets", "breastmnist", "--modes", "direct",
                "--timing-images", "64", "--batch-size", "16", "--repeats", "1",
                "--warmup-epochs", "1", "--physical-batch-sizes", "8", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = json.loads(done.stdout)["results"]
    assert not row["errors"] and set(row["epoch_time_ratio"]) == {"dp-direct", "dp-direct/parts8"}
    assert math.isfinite(row["peak_memory_ratio"]["dp-direct/parts8"])
    assert row["ratios"]["registered"]["mode"] == "direct"  # not the parts variant


@pytest.mark.slow
def test_the_noise_floor_variant_times_direct_dp_without_its_noise(shared_file: Callable[[str], Path]) -> None:
    shared_file("medmnist/breastmnist.npz")
    done = _run("--timing-only", "--models", "mlp", "--datasets", "breastmnist", "--modes", "direct",
                "--timing-images", "64", "--batch-size", "16", "--repeats", "1",
                "--warmup-epochs", "1", "--noise-floor", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["settings"]["noise_floor"] is True
    (row,) = report["results"]
    assert not row["errors"] and set(row["epoch_time_ratio"]) == {"dp-direct", "dp-direct/no-noise"}
    assert math.isfinite(row["epoch_time_ratio"]["dp-direct/no-noise"])
    assert row["ratios"]["registered"]["mode"] == "direct"  # not the noiseless variant


def test_the_noise_floor_variant_trains_with_sigma_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    sys.path.insert(0, str(REPO / "bench"))
    import architectures

    calls: list[dict[str, object]] = []
    monkeypatch.setattr(architectures, "train_dp", lambda *a, **kw: calls.append(kw))
    for variant in ("dp-direct", "dp-direct/no-noise", "dp-direct/parts8"):
        architectures._run_variant(torch.nn.Linear(2, 2), None, variant, {})  # type: ignore[arg-type]
    assert [(c["noise_multiplier"], c["physical_batch_size"]) for c in calls] == [
        (1.0, None), (0.0, None), (1.0, 8)]
    assert all(c["grad_sample_mode"] == "direct" for c in calls)


@pytest.mark.slow
def test_memory_can_be_measured_in_a_fresh_process_per_variant(shared_file: Callable[[str], Path]) -> None:
    shared_file("medmnist/breastmnist.npz")
    done = _run("--timing-only", "--models", "cnn", "--datasets", "breastmnist", "--modes", "direct",
                "--timing-images", "64", "--batch-size", "16", "--repeats", "1", "--warmup-epochs", "1",
                "--memory", "fresh", "--memory-calls", "2", "--device", "cpu", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["settings"]["memory"] == "fresh" and report["settings"]["memory_calls"] == 2
    (row,) = report["results"]
    assert not row["errors"] and row["peak_mib"]["non-dp"] > 1 and row["peak_mib"]["dp-direct"] > 1
    assert math.isfinite(row["peak_memory_ratio"]["dp-direct"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_it_is_a_clear_usage_error() -> None:
    done = _run("--timing-only", "--models", "cnn", "--device", "cuda")
    assert done.returncode == 2
    assert "CUDA is not available" in done.stderr and "Traceback" not in done.stderr


def test_peak_memory_is_measured_in_a_child_from_the_parents_heap() -> None:
    """``_peak_of`` reads the peak of what the call allocates, in a forked child: the
    parent's memory and state are untouched, and a failing call is reported."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import architectures  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "bench"))
    kept: list[torch.Tensor] = []

    def allocate() -> None:
        kept.append(torch.ones(64 * 2**20 // 4))  # 64 MiB, touched

    def allocate_little() -> None:
        kept.append(torch.ones(2**18 // 4))  # 256 KiB: the same first-call costs, if any

    big, little = architectures._peak_of(allocate), architectures._peak_of(allocate_little)
    assert 56 <= big - little <= 72, (big, little)
    assert architectures._peak_of(lambda: None) < 8
    assert kept == []  # the child's list, not this one
    with pytest.raises(RuntimeError, match="child failed"):
        architectures._peak_of(lambda: 1 / 0)
