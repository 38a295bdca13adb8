"""Data augmentation as a run setting: ``--augment none`` vs ``light`` (= ``auto`` here).

Real BreastMNIST (``vesalius import``, 3 hospitals, IID), ε = 8 per hospital, the same
supervised federation with and without augmentation of each training record at the nodes
(:mod:`client.data.augment`; for a binary task on 2D images ``auto`` resolves to ``light``:
left-right flip, rotation up to 15 degrees, intensity scale and shift). Each federation has
its own ledgers. ``federated`` is the pooled test AUC of the final model; ``pooled`` the
pooled non-private model trained without augmentation (``bench/tasks.py``'s baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.paradigm_cases import SEED, bench_row, simulate
from bench.paradigm_cases import num as _num


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    from bench.tasks import EPSILON, _baseline_dicom, _prepare_dicom
    from client.data.augment import resolve_level

    row = bench_row("breastmnist", quick)
    root = work / "data"
    prepared = _prepare_dicom(row, root, SEED)
    pooled = _num(_baseline_dicom(row, root, seed=SEED)["metrics"].get("auc"))
    rows = []
    for level in ("none", "light"):
        doc = simulate(row, root, work / f"augment-{level}", augment=level)
        rows.append({
            "comparison": "augment none vs light/auto", "data": "BreastMNIST (real)",
            "metric": "auc", "variant": f"--augment {level} (ε={EPSILON:g})",
            "federated": _num(doc["inference"]["metrics"]["auc"]), "pooled": pooled,
            "pooled_on": "every training label, no augmentation (non-private)",
            "auto_means": resolve_level("auto", row.task, row.samples),
            "epsilon_max": max(_num(s["epsilon"]) for s in doc["sites"]),
            "hospitals": 3, "how": prepared["how"], "rounds": row.rounds})
    return rows
