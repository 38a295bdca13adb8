"""Single-task vs multi-task at the same ε, on real CT patches with lung-tumour masks.

Data: the MSD Task06 lung patches of ``../shared/data`` (``val_patches.h5`` and
``test_patches.h5``: 26 patients, 260 patches of 48 x 48 at 2 mm, CC BY-SA 4.0). The files
hold no patient ids (each holds 13 patients' patches, 10 per patient, apparently stored
patient by patient). A node always splits its own patients 70/15/15 into train / val / test,
so with the 8-9 real patients a hospital would hold its test split has 0 or 1 patient:
nothing to score. The bench therefore writes each patch as its own pseudonymous study
(``PATCHES_PER_STUDY = 1``; set it to 10 to group by the inferred patients), as the
``msd-lung-seg`` row of ``bench/tasks.py`` also does: the DP unit is the patch, not the
patient (a real patient's 10 patches are 10 records, so its guarantee is the group one),
and patches of one patient may fall in both the train and test splits, which flatters the
federated and the pooled results alike. The studies (each image a Secondary Capture CT
patch with a derived mask instance, the layout :mod:`client.data.segmentation` reads) are
dealt round-robin to 3 hospitals.

Arms, each its own federation (``--paradigm multi-task --model multi-task-unet``, ε = 8 at
every hospital, its own ledgers), with the same trunk, data, rounds and ε:

* **segmentation only** (``-P presence-weight=0``): the mask head alone (pooled mean Dice per
  test patient);
* **presence only** (``-P segmentation-weight=0``): the lesion-present head alone (pooled
  AUC per image, each test patient weighing 1);
* **multi-task** (``segmentation-weight=1, presence-weight=0.5``): both heads; one row per
  task.

``pooled`` is the same arm trained non-private on the union of the hospitals' training
patients (same initial weights, epochs = rounds x local epochs) and scored on the union of
their test patients with the same statistics as the federation's
(:func:`client.queries.segmentation.patient_cases`, :func:`client.queries.multi_task.
presence_histograms`, :func:`server.paradigms.multi_task.presence_summary`).
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from bench.paradigm_cases import SEED, bench_row, simulate
from bench.paradigm_cases import num as _num

PATCHES_PER_STUDY = 1
"""Patches written as one pseudonymous study (patient); see the module docstring."""
FILES = ("val_patches.h5", "test_patches.h5")
MODEL = "multi-task-unet"

ARMS = (
    ("segmentation only", {"segmentation-weight": 1.0, "presence-weight": 0.0}, ("dice",)),
    ("presence only", {"segmentation-weight": 0.0, "presence-weight": 1.0}, ("presence_auc",)),
    ("multi-task", {"segmentation-weight": 1.0, "presence-weight": 0.5},
     ("dice", "presence_auc")),
)
"""(arm, paradigm options, metrics it is scored on)."""

QUICK = {"rounds": 1, "local_epochs": 1}
"""Quick mode: one round of one local epoch per arm (a smoke run of a few minutes)."""


def _mask_instance(mask: np.ndarray, image: Any, *, number: int) -> Any:
    """A derived mask instance (Secondary Capture, modality OT) referencing ``image``."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

    from client.dicom.synth_common import synthetic_instance
    from client.dicom.synth_seg import MASK_MODALITY, MASK_SERIES_DESCRIPTION

    def uid(part: str) -> str:
        return str(generate_uid(entropy_srcs=["vesalius-bench-mask", image.SOPInstanceUID, part]))

    ds = synthetic_instance(SecondaryCaptureImageStorage, uid("sop"),
                            image_type=["DERIVED", "SECONDARY", "MASK"],
                            modality=MASK_MODALITY, patient_id=str(image.PatientID))
    ds.SeriesDescription = MASK_SERIES_DESCRIPTION
    ds.StudyInstanceUID = image.StudyInstanceUID
    ds.SeriesInstanceUID = str(generate_uid(entropy_srcs=["vesalius-bench-mask",
                                                          image.StudyInstanceUID]))
    ds.StudyID = image.StudyID
    ds.SeriesNumber = 2
    ds.InstanceNumber = number
    ref = Dataset()
    ref.ReferencedSOPClassUID = image.SOPClassUID
    ref.ReferencedSOPInstanceUID = image.SOPInstanceUID
    ds.ReferencedImageSequence = Sequence([ref])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(mask.shape[0]), int(mask.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(mask, dtype=np.uint8).tobytes()
    return ds


def prepare_hospitals(root: Path, hospitals: int = 3) -> dict[str, Any]:
    """Write the MSD patients as ``root/site-1..hospitals`` (see the module docstring)."""
    from client.dicom.import_dicom import image_dataset, new_study_ids, pseudonym

    from bench.tasks import _msd_arrays

    patient = 0
    per_site = [0] * hospitals
    for name in FILES:
        images, masks = _msd_arrays(name)
        pixels = np.clip(np.rint(images.numpy()[:, 0] * 255.0), 0, 255).astype(np.uint8)
        labels = masks.numpy().astype(np.uint8)
        for start in range(0, len(pixels), PATCHES_PER_STUDY):
            block = slice(start, start + PATCHES_PER_STUDY)
            site = patient % hospitals
            key = hashlib.sha256(pixels[block].tobytes() + labels[block].tobytes()).hexdigest()
            ids = new_study_ids(pseudonym(patient), key)
            study = root / f"site-{site + 1}" / "dicom" / ids.patient_id / "ST1"
            (study / "SE1").mkdir(parents=True, exist_ok=True)
            (study / "SE2").mkdir(parents=True, exist_ok=True)
            for number, (image, mask) in enumerate(zip(pixels[block], labels[block]), start=1):
                ds = image_dataset(image, ids=ids, instance_number=number, pixel_spacing_mm=2.0)
                ds.Modality = "CT"  # real CT patches; "OT" with a reference marks a mask
                ds.save_as(study / "SE1" / f"IM{number}.dcm", enforce_file_format=True)
                _mask_instance(mask, ds, number=number).save_as(
                    study / "SE2" / f"MASK{number}.dcm", enforce_file_format=True)
            per_site[site] += 1
            patient += 1
    return {"patients_per_site": per_site,
            "how": f"MSD Task06 lung patches (val + test files), {PATCHES_PER_STUDY} patch(es) "
                   f"per pseudonymous study, dealt round-robin to {hospitals} hospitals as "
                   "DICOM image + derived-mask pairs (DP unit = study)"}


def _scores(model: Any, split: Any) -> dict[str, float]:
    """Mean Dice per patient and the patient-weighted presence AUC of ``model`` on ``split``."""
    import torch

    from client.queries.multi_task import presence_histograms
    from client.queries.segmentation import patient_cases, predicted_masks
    from server.paradigms.multi_task import presence_summary

    device = torch.device("cpu")
    index = split.patient_index.numpy()
    true = split.labels.numpy() >= 1
    cases = patient_cases(predicted_masks(model, split.images, device), true, index,
                          spacing=(1.0, 1.0, 1.0), clip=float("inf"))
    model.eval()
    scores = model.presence_probability(split.images).double().numpy()
    hist = presence_histograms(scores, true.reshape(len(true), -1).any(axis=1), index, 1000)
    presence = presence_summary(hist)
    return {"dice_sum": float(sum(c.dice for c in cases)), "patients": float(len(cases)),
            "hist": hist, "presence": presence}


def pooled_baseline(row: Any, root: Path, options: dict[str, float]) -> dict[str, Any]:
    """The arm trained non-private on the pooled training patients; scored on pooled test."""
    from bench.tasks import _plan, _pooled_train
    from client.data import PatientRecordDataset
    from client.data.task_data import load_task_data
    from client.paradigms.multi_task import multi_task_loss
    from common.config import RunConfig
    from server.app import initial_model
    from server.paradigms.multi_task import presence_summary

    sites = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    data = [load_task_data(d, task="segmentation", samples="image-2d",
                           image_size=row.image_size, seed=0) for d in sites]
    plan = _plan(row, private=False, seed=SEED, epsilon=8.0)
    model = initial_model(RunConfig(plan=plan))[0]
    loss = multi_task_loss(options["segmentation-weight"], options["presence-weight"])
    wall = _pooled_train(model, [PatientRecordDataset(nd.train) for nd in data], row,
                         seed=SEED, loss_kwargs={"input_loss": loss})
    scored = [_scores(model, nd.test) for nd in data if nd.test.num_patients]
    patients = sum(s["patients"] for s in scored)
    presence = presence_summary(sum(s["hist"] for s in scored))
    return {"dice": sum(s["dice_sum"] for s in scored) / patients if patients else None,
            "presence_auc": presence["auc"], "test_patients": int(patients), "wall_s": wall}


def _federated(doc: dict[str, Any]) -> dict[str, Any]:
    section = doc.get("paradigm") or {}
    pooled = (section.get("presence") or {}).get("pooled") or {}
    seg = (doc.get("inference") or {}).get("segmentation") or {}
    return {"dice": _num(seg.get("dice")), "presence_auc": _num(pooled.get("auc")),
            "test_patients": seg.get("n"),
            "presence_weights": [pooled.get("lesion_weight"), pooled.get("no_lesion_weight")]}


METRICS = {"dice": "mean Dice per test patient",
           "presence_auc": "lesion-present AUC per image (each patient weighs 1)"}


def run(work: Path, quick: bool) -> list[dict[str, Any]]:
    """The comparison's rows (see the module docstring)."""
    base = bench_row("msd-lung-seg", False)
    row = dataclasses.replace(base, model=MODEL, **(QUICK if quick else {}))
    root = work / "data"
    prepared = prepare_hospitals(root)
    out = []
    for arm, options, metrics in ARMS:
        slug = arm.replace(" ", "-")
        doc = simulate(row, root, work / slug, paradigm="multi-task", options=options,
                       run_id=f"bench-multi-task-{slug}")
        fed = _federated(doc)
        pooled = pooled_baseline(row, root, options)
        for metric in metrics:
            out.append({
                "comparison": "single-task vs multi-task",
                "data": "MSD Task06 lung CT patches (real)", "metric": metric,
                "metric_text": METRICS[metric], "variant": arm, "federated": fed[metric],
                "pooled": _num(pooled[metric]), "pooled_on": "every training patient "
                "(non-private), same arm and weights",
                "epsilon_max": max(float(s["epsilon"]) for s in doc["sites"]),
                "train_patients": [s["num_examples"] for s in doc["sites"]],
                "test_patients": fed["test_patients"],
                "presence_test_weight_lesion_none": fed["presence_weights"],
                "hospitals": len(doc["sites"]), "model": MODEL, "options": options,
                "dp_unit": "patient" if PATCHES_PER_STUDY > 1 else "patch",
                "rounds": row.rounds, "local_epochs": row.local_epochs,
                "image_size": row.image_size, "how": prepared["how"],
                "patients_per_site": prepared["patients_per_site"]})
    return out
