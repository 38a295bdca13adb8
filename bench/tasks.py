"""Per task: the federated DP result beside a pooled non-private baseline, in the same run.

Usage::

    python bench/tasks.py [--json] [--quick] [--only ROW[,ROW]] [--rounds N] [--patients N]
        [--epsilon 8] [--seed 0] [--workdir DIR] [--threads 1] [--verbose]

Every row trains one task twice from the same initial weights (seed ``--seed``):

* **federated DP**: 3 hospitals (4 for UCI Heart Disease, its real sites), patient-level
  DP-SGD at each with a target epsilon of 8 (``--epsilon``; each hospital's cap is the same),
  sample-weighted FedAvg;
* **pooled non-private**: the same model on the union of the hospitals' training patients,
  plain SGD (:func:`client.training.train_dp` with ``private=False`` and the task's loss,
  :func:`common.tasks.federated.train_losses`), the same budget of epochs (rounds x local
  epochs) in the same chunks (one chunk = one round's local epochs), with the coordinator's
  model selection rule on the pooled validation patients (the chunk with the best validation
  AUC when every chunk has one, else the lowest validation loss; see
  :func:`server.final_model.select_final_round`), scored on the union of the hospitals' test
  patients.

Two kinds of row:

* **DICOM rows** go through the product end to end: the data are written as PHI-free DICOM
  node folders (``vesalius import`` of a MedMNIST ``.npz`` split into 3 hospitals, or
  ``vesalius synth --task T``), the federation is :func:`server.simulation.run_simulation`
  (Flower's simulation runtime; the real ClientApp and ServerApp; a fresh privacy ledger per
  run) and its metric is the report's pooled test inference, computed by the coordinator from
  the nodes' statistics queries (binned histograms for AUCs). The baseline reads the same
  node folders with :func:`client.data.task_data.load_task_data` (the node's own
  preprocessing and patient-level splits, seed 0 as the node uses) and is scored with
  ``sklearn`` on the pooled per-patient predictions of :func:`client.training.evaluate`.
* **in-process rows** bypass DICOM ingestion and Flower: the MSD lung-tumour patches (U-Net;
  the HDF5 patches are not converted to DICOM image/mask pairs here) and UCI Heart Disease
  ``num`` 0-4 (MLP on the tabular features; the node pipeline reads images only). FedAvg is a loop over :func:`train_dp` with each hospital's noise multiplier
  planned for epsilon <= 8 over all its rounds (:func:`common.privacy.plan_noise_multiplier`)
  and its accountant history composed across rounds (``prior=``); the last round's model is
  scored, and the baseline after the same number of epochs (no model selection).

Metrics (the ratio is federated / pooled; for an error such as MAE or MSE a ratio above 1 is
worse): binary AUC; multi-class macro one-vs-rest AUC; multi-label macro AUC; ordinal
quadratic-weighted kappa; regression MAE (R^2 beside it); segmentation mean Dice;
reconstruction validation MSE (voxel mean) of the selected checkpoint.

Caveats printed with the rows: the simulated hospitals release statistics down to a count of
1 (``min-release-count=1``, so that small test sets are scored); wall seconds of the
federation include Ray's start and the coordinator's inference queries, the baseline's the
reading of the DICOM folders.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import ConcatDataset, Dataset, TensorDataset  # noqa: E402

EPSILON = 8.0
HOSPITALS = 3


@dataclass(frozen=True)
class Row:
    """One benchmark row: a dataset, its task and model, and the training budget."""

    name: str
    dataset: str
    task: str
    model: str
    samples: str
    source: str
    """"import" (a MedMNIST .npz), "synth", "msd" or "heart" (the last two in-process)."""
    metric: str
    num_classes: int = 2
    image_size: int = 28
    patients: int = 150
    """Patients (volumes, images) per hospital; 0 = all the source holds."""
    rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    higher_is_better: bool = True

    @property
    def in_process(self) -> bool:
        return self.source in ("msd", "heart")


ROWS: tuple[Row, ...] = (
    Row("breastmnist", "BreastMNIST (real)", "binary", "cnn", "image-2d", "import", "auc",
        patients=0, rounds=8, local_epochs=2),
    Row("pneumoniamnist", "PneumoniaMNIST (real)", "binary", "cnn", "image-2d", "import", "auc",
        patients=1000, rounds=6, local_epochs=1),
    Row("adrenalmnist3d", "AdrenalMNIST3D (real)", "binary", "cnn3d", "volume-3d", "import",
        "auc", patients=150, rounds=6, local_epochs=1, batch_size=16),
    Row("msd-lung-seg", "MSD Task06 lung CT patches (real)", "segmentation", "unet",
        "image-2d", "msd", "dice", image_size=48, patients=0, rounds=10, local_epochs=2,
        batch_size=16),
    Row("heart-ordinal", "UCI Heart Disease, 4 hospitals (real)", "ordinal", "mlp(tabular)",
        "tabular", "heart", "kappa_quadratic", num_classes=5, patients=0, rounds=30,
        local_epochs=1, batch_size=32),
    Row("synth-multiclass", "synthetic DICOM", "multiclass", "cnn", "image-2d", "synth",
        "macro_auc", num_classes=4, image_size=32, patients=200, rounds=8),
    Row("synth-multilabel", "synthetic DICOM", "multilabel", "cnn", "image-2d", "synth",
        "macro_auc", num_classes=3, image_size=32, patients=200, rounds=8),
    Row("synth-regression", "synthetic DICOM", "regression", "cnn", "image-2d", "synth", "mae",
        image_size=32, patients=200, rounds=10, local_epochs=2, learning_rate=0.003,
        higher_is_better=False),
    Row("synth-reconstruction", "synthetic DICOM", "reconstruction", "autoencoder", "image-2d",
        "synth", "val_mse", image_size=32, patients=200, higher_is_better=False),
)

QUICK: dict[str, dict[str, int]] = {
    "breastmnist": {"patients": 100, "rounds": 2, "local_epochs": 1},
    "pneumoniamnist": {"patients": 150, "rounds": 2},
    "adrenalmnist3d": {"patients": 40, "rounds": 2},
    "msd-lung-seg": {"rounds": 2, "local_epochs": 1},
    "heart-ordinal": {"rounds": 5},
    "synth-multiclass": {"patients": 40, "rounds": 2},
    "synth-multilabel": {"patients": 40, "rounds": 2},
    "synth-regression": {"patients": 40, "rounds": 2, "local_epochs": 1},
    "synth-reconstruction": {"patients": 40, "rounds": 2},
}
"""``--quick`` overrides per row: a smoke run of a few minutes."""

# Learning rates: 0.05 (the plan's default) except regression, whose raw targets (lesion area,
# 0-50 cm2) make non-private SGD at 0.05 or 0.01 diverge or stall; 0.003 learns there in
# 20 epochs (measured, pooled side) and both sides use it.

MEDMNIST_FILES = {"breastmnist": "medmnist/breastmnist.npz",
                  "pneumoniamnist": "medmnist/pneumoniamnist.npz",
                  "adrenalmnist3d": "medmnist/adrenalmnist3d.npz"}
MSD_DIR = "segmentation/msd_task06_lung_2mm_patches"
HEART_SITES = (("cleveland", "Cleveland"), ("hungarian", "Hungary"),
               ("switzerland", "Switzerland"), ("va", "Long Beach VA"))
HEART_FEATURES = ("age", "sex", "cp", "trestbps", "chol", "fbs", "restecg", "thalach",
                  "exang", "oldpeak")
"""FLamby's Fed-Heart-Disease columns (``slope``, ``ca``, ``thal`` dropped; see the data
README); the target is ``num`` (0-4), the last field."""

Log = Callable[[str], None]


# --------------------------------------------------------------------------- shared helpers

def _fedavg(states: list[dict[str, torch.Tensor]], weights: list[int]) -> dict[str, torch.Tensor]:
    """Sample-weighted mean of state dicts (Flower's FedAvg rule; integer buffers rounded)."""
    total = float(sum(weights))
    out: dict[str, torch.Tensor] = {}
    for key, ref in states[0].items():
        acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights, strict=True))
        out[key] = acc.to(ref.dtype) if ref.is_floating_point() else acc.round().to(ref.dtype)
    return out


def _pooled_metric(task: str, scores: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The row's metric with sklearn on pooled per-patient predictions (baseline side)."""
    from sklearn.metrics import cohen_kappa_score, r2_score, roc_auc_score

    if task == "binary":
        return {"auc": float(roc_auc_score(labels, scores))}
    if task == "multiclass":
        return {"macro_auc": float(roc_auc_score(labels, scores, multi_class="ovr",
                                                 average="macro"))}
    if task == "multilabel":
        return {"macro_auc": float(roc_auc_score(labels, scores, average="macro"))}
    if task == "ordinal":
        from client.queries.ordinal import predicted_grades

        return {"kappa_quadratic": float(cohen_kappa_score(labels, predicted_grades(scores),
                                                           weights="quadratic"))}
    if task == "regression":
        return {"mae": float(np.mean(np.abs(scores - labels))),
                "r2": float(r2_score(labels, scores))}
    raise ValueError(f"no pooled metric for {task}")


def _num(value: Any) -> float:
    if isinstance(value, dict):
        value = value.get("value")
    return float(value) if isinstance(value, (int, float)) else math.nan


def _dig(doc: Any, path: str) -> Any:
    for part in path.split("."):
        doc = doc.get(part) if isinstance(doc, dict) else None
    return doc


# ----------------------------------------------------------------------------- DICOM rows

def _prepare_dicom(row: Row, root: Path, seed: int) -> dict[str, Any]:
    """Write the row's hospitals ``root/site-1..3``; return what was written."""
    if row.source == "import":
        from client.dicom.importer import ImportOptions, import_dataset
        from common.shared_data import require_shared_file

        source = require_shared_file(MEDMNIST_FILES[row.name])
        total = row.patients * HOSPITALS if row.patients else None
        summary = import_dataset(source, root, options=ImportOptions(
            sites=HOSPITALS, split="iid", seed=seed, max_images=total))
        return {"how": f"vesalius import {source.name} --sites 3 --split iid"
                       + (f" --max-images {total}" if total else ""),
                "patients_per_site": [s.patients for s in summary.sites]}
    from client.dicom.synth_tasks import synthesize_task_federation

    sites = synthesize_task_federation(root, task=row.task,
                                       num_classes=None if row.task in ("regression", "reconstruction")
                                       else row.num_classes,
                                       n_sites=HOSPITALS, patients_per_site=row.patients, seed=seed)
    return {"how": f"vesalius synth --task {row.task} --sites 3 --patients {row.patients}",
            "patients_per_site": [s.patients for s in sites]}


def _plan(row: Row, *, private: bool, seed: int, epsilon: float) -> Any:
    from common.config import TrainPlan

    return TrainPlan(num_rounds=row.rounds, local_epochs=row.local_epochs,
                     batch_size=row.batch_size, learning_rate=row.learning_rate,
                     private=private, target_epsilon=epsilon, model=row.model,
                     image_size=row.image_size, seed=seed, task=row.task,
                     num_classes=row.num_classes, samples=row.samples,
                     run_id=f"bench-tasks-{row.name}")


def _federate_dicom(row: Row, root: Path, work: Path, *, seed: int, epsilon: float,
                    verbose: bool) -> dict[str, Any]:
    """Flower simulation over the node folders; return metric, epsilon and the report bits."""
    from common.config import NodeConfig, RunConfig
    from server.simulation import run_simulation

    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    nodes = [NodeConfig(data_dir=d, epsilon_cap=epsilon, site_name=d.name,
                        release_histograms=True, min_release_count=1, torch_threads=1,
                        device="cpu", ledger_dir=work / "ledgers" / d.name) for d in sites]
    config = RunConfig(plan=_plan(row, private=True, seed=seed, epsilon=epsilon),
                       out_dir=str(work / "run"), min_nodes=len(nodes))
    t0 = time.perf_counter()
    doc = run_simulation(config, nodes, num_cpus=2, verbose=verbose).to_dict()
    wall = time.perf_counter() - t0
    if doc.get("status") != "completed":
        raise RuntimeError(f"federation {doc.get('status')}: {doc.get('reason')}")
    inference = doc.get("inference") or {}
    paths = {"binary": {"auc": "metrics.auc"},
             "multiclass": {"macro_auc": "multiclass.auc.macro"},
             "multilabel": {"macro_auc": "multilabel.auc.macro"},
             "ordinal": {"kappa_quadratic": "ordinal.kappa_quadratic"},
             "regression": {"mae": "regression.mae", "r2": "regression.r2"}}
    if row.task == "reconstruction":
        selection = doc.get("model_selection") or {}
        metrics = {"val_mse": _num(selection.get("value"))}
        note = f"validation loss of the selected round {selection.get('final_round')}"
    else:
        metrics = {key: _num(_dig(inference, path)) for key, path in paths[row.task].items()}
        note = str(inference.get("auc_note") or inference.get("metrics_note") or "")
        if inference.get("status") != "completed":
            note = f"inference {inference.get('status')}: {inference.get('reason')}"
    eps = [float(s["epsilon"]) for s in doc.get("sites", [])]
    return {"metrics": metrics, "epsilon_max": max(eps) if eps else math.nan,
            "noise_multipliers": [s.get("noise_multiplier") for s in doc.get("sites", [])],
            "train_patients": [s.get("num_examples") for s in doc.get("sites", [])],
            "test_patients": inference.get("n"),
            "selection": {key: (doc.get("model_selection") or {}).get(key)
                          for key in ("final_round", "selection", "metric", "value")},
            "wall_s": wall, "note": note}


def _val_auc(task: str, results: list[Any]) -> float:
    """Pooled validation AUC (binary, macro for multi-class and multi-label), NaN if undefined."""
    if task not in ("binary", "multiclass", "multilabel") or not results:
        return math.nan
    try:
        scores = np.concatenate([r.scores for r in results])
        labels = np.concatenate([r.labels for r in results])
        return next(iter(_pooled_metric(task, scores, labels).values()))
    except ValueError:  # a class absent from the validation patients
        return math.nan


def _select_chunk(chunks: list[tuple[float, float, Any]]) -> dict[str, Any]:
    """The coordinator's rule (:func:`server.final_model.select_final_round`) on the pooled
    validation patients: the best AUC when every chunk has one, else the lowest loss; ties go
    to the later chunk."""
    if all(math.isfinite(auc) for auc, _, _ in chunks):
        best = max(range(len(chunks)), key=lambda i: (chunks[i][0], i))
        return {"chunk": best + 1, "selection": "best validation AUC", "value": chunks[best][0]}
    best = max(range(len(chunks)), key=lambda i: (-chunks[i][1], i))
    return {"chunk": best + 1, "selection": "lowest validation loss", "value": chunks[best][1]}


def _baseline_dicom(row: Row, root: Path, *, seed: int) -> dict[str, Any]:
    """Pooled non-private training on the union of the node folders' train splits."""
    from client.data import PatientRecordDataset
    from client.data.task_data import load_task_data
    from client.training import evaluate, train_dp
    from common.config import RunConfig
    from common.tasks import get_task
    from common.tasks.federated import prepare_for_training, train_losses
    from server.app import initial_model

    t0 = time.perf_counter()
    task = get_task(row.task)
    plan = _plan(row, private=False, seed=seed, epsilon=EPSILON)
    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    data = [load_task_data(d, task=row.task, num_classes=row.num_classes, samples=row.samples,
                           image_size=row.image_size, seed=0) for d in sites]
    train = ConcatDataset([PatientRecordDataset(nd.train) for nd in data])
    # the federation's initial weights (the coordinator's seeded model)
    model = prepare_for_training(task, initial_model(RunConfig(plan=plan))[0])

    def pooled_eval(split: str) -> tuple[float, list[Any]]:
        results = [evaluate(model, getattr(nd, split).images, getattr(nd, split).labels,
                            patient_index=getattr(nd, split).patient_index, device="cpu",
                            task=task, num_classes=row.num_classes) for nd in data
                   if len(getattr(nd, split))]
        images = [len(getattr(nd, split)) for nd in data if len(getattr(nd, split))]
        return float(np.average([r.loss for r in results], weights=images)), results

    chunks: list[tuple[float, float, dict[str, torch.Tensor]]] = []  # (val AUC, loss, state)
    for chunk in range(row.rounds):
        res = train_dp(model, train, epochs=row.local_epochs, batch_size=row.batch_size,
                       learning_rate=row.learning_rate, noise_multiplier=0.0,
                       max_grad_norm=1.0, delta=1e-5, private=False, device="cpu",
                       seed=seed * 1000 + chunk + 1, **train_losses(task))
        model.load_state_dict(res.state_dict)
        val_loss, results = pooled_eval("val")
        chunks.append((_val_auc(row.task, results), val_loss, copy.deepcopy(res.state_dict)))
    best = _select_chunk(chunks)
    model.load_state_dict(chunks[best["chunk"] - 1][2])
    if row.task == "reconstruction":
        metrics = {"val_mse": chunks[best["chunk"] - 1][1]}
        test_patients = sum(nd.val.num_patients for nd in data)
    else:
        _, results = pooled_eval("test")
        scores = np.concatenate([r.scores for r in results])
        labels = np.concatenate([r.labels for r in results])
        metrics = _pooled_metric(row.task, scores, labels)
        test_patients = len(labels)
    return {"metrics": metrics, "train_patients": [nd.train.num_patients for nd in data],
            "test_patients": test_patients, "selection": best,
            "patients": sum(nd.train.num_patients + nd.val.num_patients + nd.test.num_patients
                            for nd in data),
            "wall_s": time.perf_counter() - t0}


def run_dicom_row(row: Row, work: Path, *, seed: int, epsilon: float, verbose: bool,
                  log: Log) -> dict[str, Any]:
    """Prepare the DICOM hospitals, run the federation, then the pooled baseline."""
    root = work / "data"
    t0 = time.perf_counter()
    prepared = _prepare_dicom(row, root, seed)
    prep_s = time.perf_counter() - t0
    log(f"  {row.name}: {prepared['how']} ({prep_s:.0f} s); federating ...")
    fed = _federate_dicom(row, root, work, seed=seed, epsilon=epsilon, verbose=verbose)
    log(f"  {row.name}: federated {fed['metrics']} ({fed['wall_s']:.0f} s); pooled baseline ...")
    base = _baseline_dicom(row, root, seed=seed)
    return {"prepare": prepared, "prepare_s": prep_s, "federated": fed, "pooled": base,
            "patients": base["patients"], "sites": len(prepared["patients_per_site"]),
            "path": "DICOM node folders -> Flower simulation (real ClientApp/ServerApp)"}


# ----------------------------------------------------------------------- in-process rows

def _dp_fedavg(model: torch.nn.Module, sites: list[Dataset[Any]], row: Row, *, epsilon: float,
               loss_kwargs: dict[str, Any]) -> dict[str, Any]:
    """FedAvg over ``train_dp`` with DP-SGD at each site (epsilon <= target per site).

    Each site's noise multiplier is planned for its whole plan (rounds x local epochs) and
    its accountant history composes across rounds; the noise is never seeded, as at a node.
    """
    from client.training import train_dp
    from common.privacy import (default_delta, plan_noise_multiplier, sample_rate,
                                steps_per_epoch)

    sizes = [len(d) for d in sites]  # type: ignore[arg-type]
    deltas = [default_delta(n) for n in sizes]
    sigmas = [plan_noise_multiplier(
        target_epsilon=epsilon, delta=delta, sample_rate=sample_rate(n, row.batch_size),
        steps=row.rounds * row.local_epochs * steps_per_epoch(n, row.batch_size))
        for n, delta in zip(sizes, deltas, strict=True)]
    priors: list[Any] = [None] * len(sites)
    eps = [0.0] * len(sites)
    t0 = time.perf_counter()
    for _ in range(row.rounds):
        results = []
        for i, data in enumerate(sites):
            res = train_dp(model, data, epochs=row.local_epochs, batch_size=row.batch_size,
                           learning_rate=row.learning_rate, noise_multiplier=sigmas[i],
                           max_grad_norm=1.0, delta=deltas[i], prior=priors[i], private=True,
                           device="cpu", seed=None, **loss_kwargs)
            priors[i], eps[i] = res.accountant_state, res.epsilon
            results.append(res)
        model.load_state_dict(_fedavg([r.state_dict for r in results],
                                      [r.num_examples for r in results]))
    return {"epsilon_max": max(eps), "epsilons": eps, "noise_multipliers": sigmas,
            "deltas": deltas, "train_patients": sizes, "wall_s": time.perf_counter() - t0}


def _pooled_train(model: torch.nn.Module, sites: list[Dataset[Any]], row: Row, *, seed: int,
                  loss_kwargs: dict[str, Any]) -> float:
    from client.training import train_dp

    t0 = time.perf_counter()
    res = train_dp(model, ConcatDataset(sites), epochs=row.rounds * row.local_epochs,
                   batch_size=row.batch_size, learning_rate=row.learning_rate,
                   noise_multiplier=0.0, max_grad_norm=1.0, delta=1e-5, private=False,
                   device="cpu", seed=seed, **loss_kwargs)
    model.load_state_dict(res.state_dict)
    return time.perf_counter() - t0


def _msd_arrays(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    import h5py

    from common.shared_data import require_shared_file

    with h5py.File(require_shared_file(f"{MSD_DIR}/{name}"), "r") as f:
        images = torch.from_numpy(np.asarray(f["images"], dtype=np.float32))
        masks = torch.from_numpy(np.asarray(f["labels"])[:, 0].round().astype(np.int64))
    return images.contiguous(), masks.contiguous()


def run_msd_row(row: Row, *, seed: int, epsilon: float, log: Log) -> dict[str, Any]:
    """U-Net on the MSD lung patches: hospitals from ``val_patches.h5``, test on ``test_``."""
    from client.training import evaluate
    from common.models import build_model
    from common.tasks import get_task

    task = get_task("segmentation")
    images, masks = _msd_arrays("val_patches.h5")
    test_x, test_y = _msd_arrays("test_patches.h5")
    blocks = np.array_split(np.arange(len(images)), HOSPITALS)
    sites: list[Dataset[Any]] = [TensorDataset(images[b], masks[b]) for b in blocks]
    torch.manual_seed(seed)
    init = build_model("unet", num_classes=task.num_outputs(2), image_size=row.image_size,
                       spatial_dims=2)

    def score(model: torch.nn.Module) -> float:
        ev = evaluate(model, test_x, test_y, device="cpu", task=task, num_classes=2)
        return float(ev.extra["dice"]) if "dice" in ev.extra else float(np.mean(ev.scores))

    fed_model = copy.deepcopy(init)
    fed = _dp_fedavg(fed_model, sites, row, epsilon=epsilon, loss_kwargs={})
    t0 = time.perf_counter()
    fed["metrics"] = {"dice": score(fed_model)}
    fed["wall_s"] += time.perf_counter() - t0
    log(f"  {row.name}: federated {fed['metrics']} ({fed['wall_s']:.0f} s); pooled baseline ...")
    base_model = copy.deepcopy(init)
    wall = _pooled_train(base_model, sites, row, seed=seed, loss_kwargs={})
    t0 = time.perf_counter()
    base = {"metrics": {"dice": score(base_model)}, "train_patients": [len(b) for b in blocks],
            "wall_s": wall + time.perf_counter() - t0}
    return {"federated": fed, "pooled": base, "sites": HOSPITALS, "patients": 26,
            "patches": {"train": len(images), "test": len(test_x)},
            "path": "in-process (bypasses DICOM ingestion and Flower): FedAvg loop over "
                    "train_dp; hospitals = 3 contiguous blocks of val_patches.h5 (13 patients; "
                    "the file has no patient ids, so the DP unit is the patch, not the patient, "
                    "and the blocks are patient-disjoint only if patches are stored by "
                    "patient); pooled test = test_patches.h5 (13 other patients); metric = "
                    "mean per-patch foreground Dice (client.training.evaluate)"}


def _heart_site(stem: str) -> tuple[np.ndarray, np.ndarray]:
    from common.shared_data import require_shared_file

    rows = []
    for line in require_shared_file(f"heart_disease_uci/processed.{stem}.data").read_text().splitlines():
        fields = line.strip().split(",")
        if len(fields) != 14:
            continue
        kept = fields[:10] + fields[13:]  # drop slope, ca, thal (FLamby)
        if "?" in kept:
            continue
        rows.append([float(v) for v in kept])
    table = np.asarray(rows, dtype=np.float64)
    return table[:, :10], table[:, 10].astype(np.int64)


def run_heart_row(row: Row, *, seed: int, epsilon: float, log: Log) -> dict[str, Any]:
    """Ordinal ``num`` 0-4 over the 4 real UCI hospitals: MLP, in-process FedAvg + DP."""
    from sklearn.model_selection import train_test_split

    from client.queries.ordinal import predicted_grades
    from common.models.mlp import MLP
    from common.tasks import get_task
    from common.tasks.federated import train_losses

    task = get_task("ordinal")
    parts = []
    for i, (stem, _name) in enumerate(HEART_SITES):
        x, y = _heart_site(stem)
        counts = np.bincount(y, minlength=5)
        strat = y if counts[counts > 0].min() >= 2 else None
        parts.append(train_test_split(x, y, test_size=0.25, random_state=seed + i, stratify=strat))
    train_x = np.vstack([p[0] for p in parts])
    mean, sd = train_x.mean(0), train_x.std(0) + 1e-8

    def tensors(x: np.ndarray, y: np.ndarray) -> TensorDataset:
        return TensorDataset(torch.from_numpy(((x - mean) / sd).astype(np.float32)),
                             torch.from_numpy(y))

    sites: list[Dataset[Any]] = [tensors(p[0], p[2]) for p in parts]
    test = tensors(np.vstack([p[1] for p in parts]), np.concatenate([p[3] for p in parts]))
    loss_kwargs = train_losses(task)
    torch.manual_seed(seed)
    init = MLP(len(HEART_FEATURES), task.num_outputs(5), hidden=(32, 16))

    def kappa(model: torch.nn.Module) -> float:
        from sklearn.metrics import cohen_kappa_score

        model.eval()
        with torch.no_grad():
            p = task.predict(model(test.tensors[0])).numpy()
        return float(cohen_kappa_score(test.tensors[1].numpy(), predicted_grades(p),
                                       weights="quadratic"))

    fed_model = copy.deepcopy(init)
    fed = _dp_fedavg(fed_model, sites, row, epsilon=epsilon, loss_kwargs=loss_kwargs)
    fed["metrics"] = {"kappa_quadratic": kappa(fed_model)}
    log(f"  {row.name}: federated {fed['metrics']} ({fed['wall_s']:.0f} s); pooled baseline ...")
    base_model = copy.deepcopy(init)
    wall = _pooled_train(base_model, sites, row, seed=seed, loss_kwargs=loss_kwargs)
    base = {"metrics": {"kappa_quadratic": kappa(base_model)},
            "train_patients": [len(p[0]) for p in parts], "wall_s": wall}
    return {"federated": fed, "pooled": base, "sites": len(HEART_SITES),
            "patients": int(sum(len(p[0]) + len(p[1]) for p in parts)),
            "test_patients": len(test),
            "path": "in-process (tabular: no DICOM, no Flower): FedAvg loop over train_dp with "
                    "the ordinal task's per-sample loss; 4 real hospitals, 75/25 patient split "
                    "per hospital, features standardised with the pooled training mean/SD; "
                    "metric = sklearn quadratic-weighted kappa on the pooled held-out patients"}


# ------------------------------------------------------------------------------ the run

def run_row(row: Row, work: Path, *, seed: int, epsilon: float, verbose: bool,
            log: Log) -> dict[str, Any]:
    """One row; an exception is recorded as the row's error, never raised."""
    out: dict[str, Any] = {"row": row.name, "dataset": row.dataset, "task": row.task,
                           "model": row.model, "samples": row.samples, "metric": row.metric,
                           "rounds": row.rounds, "local_epochs": row.local_epochs,
                           "batch_size": row.batch_size, "learning_rate": row.learning_rate,
                           "target_epsilon": epsilon, "in_process": row.in_process,
                           "higher_is_better": row.higher_is_better, "error": None}
    t0 = time.perf_counter()
    try:
        if row.source == "msd":
            res = run_msd_row(row, seed=seed, epsilon=epsilon, log=log)
        elif row.source == "heart":
            res = run_heart_row(row, seed=seed, epsilon=epsilon, log=log)
        else:
            res = run_dicom_row(row, work / row.name, seed=seed, epsilon=epsilon,
                                verbose=verbose, log=log)
        out.update(res)
        fed = res["federated"]["metrics"].get(row.metric, math.nan)
        base = res["pooled"]["metrics"].get(row.metric, math.nan)
        out["federated_metric"], out["pooled_metric"] = fed, base
        out["ratio"] = fed / base if base and math.isfinite(base) else math.nan
        out["epsilon_max"] = res["federated"]["epsilon_max"]
        out["federated_wall_s"] = res["federated"]["wall_s"]
        out["pooled_wall_s"] = res["pooled"]["wall_s"]
    except Exception as exc:  # noqa: BLE001 - one row's failure must not stop the others
        out["error"] = f"{type(exc).__name__}: {exc}"
        out["traceback"] = traceback.format_exc(limit=6)[-2000:]
        log(f"  {row.name}: ERROR {out['error']}")
    out["wall_s"] = time.perf_counter() - t0
    return out


def _machine() -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": "cpu",
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def run(rows: list[Row], *, workdir: Path, seed: int, epsilon: float, threads: int,
        verbose: bool = False, log: Log | None = None) -> dict[str, Any]:
    """Run ``rows``; return the JSON-able report (one object per row, plus the machine)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    torch.set_num_threads(threads)
    saved = dict(os.environ)
    os.environ.setdefault("FLWR_HOME", str(workdir / "flwr-home"))
    os.environ["VESALIUS_HOME"] = str(workdir / "vesalius-home")  # never the user's ledgers
    for var, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")):
        os.environ.setdefault(var, value)
    t0 = time.perf_counter()
    results = []
    try:
        for row in rows:
            log(f"{row.name} ({row.task}, {row.model}, {row.rounds} rounds x "
                f"{row.local_epochs} local epochs) ...")
            results.append(run_row(row, workdir, seed=seed, epsilon=epsilon, verbose=verbose,
                                   log=log))
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return {"benchmark": "tasks", "seed": seed, "target_epsilon": epsilon,
            "rows": results, "seconds": time.perf_counter() - t0,
            "machine": _machine(),
            "notes": ["federated = 3 hospitals (UCI heart: its 4) with patient-level DP-SGD, "
                      f"target epsilon {epsilon} each; pooled = same model, non-private, on "
                      "the union of their training patients, same epochs",
                      "DICOM rows: federated metric from the coordinator's pooled test "
                      "inference (AUCs from binned score histograms), pooled metric with "
                      "sklearn on per-patient predictions of the same test patients",
                      "simulated hospitals use min-release-count=1",
                      "ratio = federated / pooled; for mae and val_mse lower is better"]}


def _fmt(value: Any, spec: str = ".3f") -> str:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return format(value, spec)
    return "-"


def print_table(report: dict[str, Any]) -> None:
    """Rich table of the rows (stdout)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Tasks: federated DP vs pooled non-private (bench/tasks.py)")
    for col in ("row", "dataset", "task", "model", "samples", "sites", "patients", "rounds",
                "ε max", "metric", "federated", "pooled", "ratio", "fed s", "pooled s", "path"):
        table.add_column(col, overflow="fold")
    for r in report["rows"]:
        if r["error"]:
            table.add_row(r["row"], r["dataset"], r["task"], r["model"], r["samples"], "", "",
                          str(r["rounds"]), "", r["metric"], "ERROR", r["error"][:120], "",
                          "", "", "")
            continue
        table.add_row(
            r["row"], r["dataset"], r["task"], r["model"], r["samples"], str(r["sites"]),
            str(r["patients"]), f"{r['rounds']}x{r['local_epochs']}",
            _fmt(r["epsilon_max"], ".2f"), r["metric"], _fmt(r["federated_metric"]),
            _fmt(r["pooled_metric"]), _fmt(r["ratio"], ".2f"),
            _fmt(r["federated_wall_s"], ".0f"), _fmt(r["pooled_wall_s"], ".0f"),
            "in-process" if r["in_process"] else "DICOM+Flower")
    console = Console(width=200)
    console.print(table)
    for note in report["notes"]:
        console.print(f"note: {note}", highlight=False)
    m = report["machine"]
    console.print(f"{m['date']}: {m['cpu_count']} CPUs, torch threads {m['torch_threads']}, "
                  f"total {report['seconds']:.0f} s", highlight=False)


def select_rows(only: str, quick: bool, rounds: int | None = None,
                patients: int | None = None) -> list[Row]:
    """The rows to run (``--only``), with the ``--quick``, ``--rounds`` and ``--patients``
    overrides (``patients`` applies to the DICOM rows only)."""
    names = [n.strip() for n in only.split(",") if n.strip()]
    known = {r.name for r in ROWS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {sorted(known)}")
    rows = [r for r in ROWS if not names or r.name in names]
    if quick:
        rows = [replace(r, **QUICK.get(r.name, {})) for r in rows]
    if rounds:
        rows = [replace(r, rounds=rounds) for r in rows]
    if patients:
        rows = [r if r.in_process else replace(r, patients=patients) for r in rows]
    return rows


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return json_safe(value.item())
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print a rich table (or one JSON document with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--only", default="", help="comma-separated rows: "
                        + ", ".join(r.name for r in ROWS))
    parser.add_argument("--quick", action="store_true", help="small sizes, 2 rounds (smoke run)")
    parser.add_argument("--rounds", type=int, default=None, help="override every row's rounds")
    parser.add_argument("--patients", type=int, default=None,
                        help="override the patients per hospital of the DICOM rows")
    parser.add_argument("--epsilon", type=float, default=EPSILON)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (main process)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the DICOM hospitals and run outputs go (kept); default a "
                        "temporary folder, removed at the end")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    parser.add_argument("--json", action="store_true", help="print one JSON document on stdout")
    args = parser.parse_args(argv)
    rows = select_rows(args.only, args.quick, args.rounds, args.patients)
    warnings.filterwarnings("ignore")
    if not args.verbose:
        logging.disable(logging.WARNING)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vesalius-bench-tasks-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = run(rows, workdir=workdir.resolve(), seed=args.seed, epsilon=args.epsilon,
                     threads=args.threads, verbose=args.verbose)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    report["settings"] = {"quick": args.quick, "only": args.only, "rows": [asdict(r) for r in rows]}
    if args.json:
        print(json.dumps(json_safe(report), default=str))
    else:
        print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
