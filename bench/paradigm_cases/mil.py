"""Slice-level vs multi-instance learning on the 3D set, at the same ε.

Real AdrenalMNIST3D (``vesalius import``, 3 hospitals, IID): each patient is one study whose
series holds the 28 slices of its volume, with the study's label (normal / hyperplasia).

* **slice-level**: the 2D ``cnn`` on the slices (``--samples image-2d``), every slice carrying
  its study's label; a patient's score is the mean of its slices' scores (the nodes' per-patient
  evaluation and pooled inference);
* **MIL**: ``--paradigm mil --model mil-attention --samples series``, attention pooling over
  each study's slices, one bag per patient.

Each arm is its own federation (ε = 8 at every hospital, its own ledgers: the comparison is of
two alternatives a hospital would choose between). ``federated`` is the arm's pooled test AUC
per patient; ``pooled`` the pooled non-private baseline of the same arm on the same patients
(``bench/tasks.py``'s ``_baseline_dicom``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from bench.paradigm_cases import SEED, bench_row, simulate

ARMS = (
    ("slice-level", "cnn", "image-2d", "supervised",
     "2D cnn on slices (bag label), study score = mean of its slices"),
    ("mil", "mil-attention", "series", "mil",
     "attention MIL over each study's slices (--paradigm mil)"),
)
"""(arm, model, samples, paradigm, variant text)."""


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    from bench.tasks import _baseline_dicom, _dig, _num, _prepare_dicom

    base = bench_row("adrenalmnist3d", quick)
    root = work / "data"
    prepared = _prepare_dicom(base, root, SEED)
    out = []
    for arm, model, samples, paradigm, variant in ARMS:
        row = dataclasses.replace(base, model=model, samples=samples)
        doc = simulate(row, root, work / arm, paradigm=paradigm, run_id=f"bench-mil-{arm}")
        pooled = _baseline_dicom(row, root, seed=SEED)
        inference = doc.get("inference") or {}
        out.append({
            "comparison": "slice-level vs MIL on the 3D set", "data": "AdrenalMNIST3D (real)",
            "metric": "auc", "variant": variant, "federated": _num(_dig(inference, "metrics.auc")),
            "pooled": _num(pooled["metrics"].get("auc")),
            "pooled_on": "every training label (non-private)",
            "epsilon_max": max(float(s["epsilon"]) for s in doc["sites"]),
            "train_patients": [s["num_examples"] for s in doc["sites"]],
            "test_patients": inference.get("n"), "hospitals": len(doc["sites"]),
            "model": model, "samples": samples, "paradigm": paradigm,
            "how": prepared["how"], "rounds": row.rounds,
            "attention": ("at the nodes only (vesalius node attention)" if paradigm == "mil"
                          else "none")})
    return out
