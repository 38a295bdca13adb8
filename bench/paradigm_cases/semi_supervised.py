"""Supervised on 10 % of the labels vs semi-supervised with the other 90 % unlabelled.

Real BreastMNIST (``vesalius import``, 3 hospitals, IID), ε = 8 per hospital, each
federation on its own ledgers:

* ``supervised, 10 % labels``: every hospital's ``labels.csv`` keeps the rows of a stratified
  10 % of its training patients (the very patients ``-P labelled-fraction=0.1`` keeps,
  :func:`client.paradigms.semi_supervised.labelled_mask`) and of all its validation and test
  patients; a plain supervised federation, which drops the unlabelled patients as it always
  does;
* ``semi-supervised, 10 % labels + 90 % unlabelled``: ``--paradigm semi-supervised
  -P labelled-fraction=0.1`` on the full folders (pseudo-labels at 0.9 and consistency).

``federated`` is the pooled test AUC of the run's final model (the report's inference);
``pooled`` is the pooled non-private model trained on the same 10 % labels
(``bench/tasks.py``'s baseline on the 10 % folders) and ``pooled_all_labels`` the one trained
on every training label (on the full folders).
"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path
from typing import Any

from bench.paradigm_cases import SEED, bench_row, simulate
from bench.paradigm_cases import num as _num

FRACTION = 0.1


def _hidden_training_patients(site: Path, row: Any) -> set[str]:
    """The training patients of ``site`` whose labels ``labelled-fraction`` hides."""
    from client.data.splits import split_patients
    from client.data.task_data import load_task_data
    from client.paradigms.semi_supervised import labelled_mask, patient_labels

    train = load_task_data(site, task=row.task, num_classes=row.num_classes,
                           samples=row.samples, image_size=row.image_size, seed=0).train
    with (site / "labels.csv").open() as fh:
        ids = {r["patient_id"] for r in csv.DictReader(fh)}
    order = split_patients(ids, seed=0).train  # patient index i of the split is order[i]
    if len(order) != train.num_patients:
        raise RuntimeError("a labelled patient has no usable image; the 10 % copy would differ")
    keep = labelled_mask(patient_labels(train), FRACTION)
    return {pid for pid, kept in zip(order, keep.tolist(), strict=True) if not kept}


def few_labels_copy(row: Any, root: Path, target: Path) -> dict[str, int]:
    """``root``'s hospitals with only the 10 % training labels (val/test keep theirs)."""
    hidden_counts = {}
    for site in sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-")):
        hidden = _hidden_training_patients(site, row)
        shutil.copytree(site, target / site.name, ignore=shutil.ignore_patterns("labels.csv"))
        with (site / "labels.csv").open() as fh:
            reader = csv.DictReader(fh)
            rows = [r for r in reader if r["patient_id"] not in hidden]
            names = list(reader.fieldnames or [])
        with (target / site.name / "labels.csv").open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=names)
            writer.writeheader()
            writer.writerows(rows)
        hidden_counts[site.name] = len(hidden)
    return hidden_counts


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    from bench.tasks import EPSILON, _baseline_dicom, _prepare_dicom

    row = bench_row("breastmnist", quick)
    root = work / "data"
    prepared = _prepare_dicom(row, root, SEED)
    few = work / "data-10pct"
    hidden = few_labels_copy(row, root, few)
    sup = simulate(row, few, work / "supervised-10pct")
    semi = simulate(row, root, work / "semi-supervised", paradigm="semi-supervised",
                    options={"labelled-fraction": FRACTION})
    pooled_few = _num(_baseline_dicom(row, few, seed=SEED)["metrics"].get("auc"))
    pooled_all = _num(_baseline_dicom(row, root, seed=SEED)["metrics"].get("auc"))
    base = {"comparison": "supervised 10 % labels vs semi-supervised", "data":
            "BreastMNIST (real)", "metric": "auc", "pooled": pooled_few,
            "pooled_on": "the same 10 % training labels (non-private)",
            "pooled_all_labels": pooled_all, "hospitals": 3, "how": prepared["how"],
            "rounds": row.rounds, "hidden_label_patients": sum(hidden.values())}

    def eps(doc: dict[str, Any]) -> float:
        return max(_num(s["epsilon"]) for s in doc["sites"])

    return [
        {**base, "variant": f"supervised, 10 % labels (ε={EPSILON:g})",
         "federated": _num(sup["inference"]["metrics"]["auc"]), "epsilon_max": eps(sup),
         "train_patients": [s["num_examples"] for s in sup["sites"]]},
        {**base, "variant": "semi-supervised, +90 % unlabelled",
         "federated": _num(semi["inference"]["metrics"]["auc"]), "epsilon_max": eps(semi),
         "train_patients": [s["num_examples"] for s in semi["sites"]],
         "method": "pseudo-label (0.9) + consistency"},
    ]
