"""A node's training data: scan -> labels -> patient-level splits -> preprocessed tensors.

This is the interface the DP trainer and the Flower ClientApp use. The unit of privacy is
the *patient*: :class:`PatientRecordDataset` exposes one record per patient, so that adding
or removing a patient changes exactly one record of the dataset Opacus samples from.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar

import torch
from torch.utils.data import Dataset

from client.data.frames import image_frames, scan_for_training
from client.data.labels import LABELS_FILENAME, read_labels
from client.data.splits import SPLIT_NAMES, SplitName, split_patients
from client.data.transforms import image_transform
from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.report import IngestionReport, build_report
from client.dicom.scan import iter_data_files
from common.errors import DataError

logger = logging.getLogger(__name__)

#: Entries kept by the in-process cache of :func:`load_node_data`.
CACHE_SIZE = 4


class PatientSplit(Protocol):
    """What :func:`build_patient_splits` needs of a built split: its size in patients and items."""

    @property
    def num_patients(self) -> int:
        """Patients in the split."""
        ...

    def __len__(self) -> int:
        """Items (images, image/mask pairs) in the split."""
        ...


_SplitT = TypeVar("_SplitT", bound=PatientSplit)


@dataclass(frozen=True, eq=False)
class SplitArrays:
    """Preprocessed images of one split.

    Attributes
    ----------
    images : torch.Tensor
        float32 ``[N, 1, S, S]`` (see :mod:`client.data.transforms`): one image per frame
        of each file (see :mod:`client.data.frames`).
    labels : torch.Tensor
        int64 ``[N]``.
    patient_index : torch.Tensor
        int64 ``[N]``: index of the image's patient within this split, in
        ``0..num_patients-1`` (patients ordered by (0010,0020) Patient ID).
    num_patients : int
        Number of patients in the split.
    """

    images: torch.Tensor
    labels: torch.Tensor
    patient_index: torch.Tensor
    num_patients: int

    def __len__(self) -> int:
        """Number of images."""
        return int(self.labels.shape[0])


class PerPatientDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Base of the one-record-per-patient datasets: ``len()`` is the number of patients.

    ``__getitem__(i)`` draws one item of patient ``i`` uniformly at random with the torch
    RNG and returns :meth:`_item` of it. Subclasses say what an item is.

    Parameters
    ----------
    patient_index : torch.Tensor
        int64 ``[N]``: the patient (``0..num_patients-1``) of each item.
    num_patients : int
        Patients; each must own at least one item.
    """

    def __init__(self, patient_index: torch.Tensor, num_patients: int) -> None:
        order = torch.argsort(patient_index, stable=True)
        counts = torch.bincount(patient_index, minlength=num_patients)
        if num_patients and int(counts.min()) == 0:
            raise ValueError("every patient of a split must have at least one image")
        self._num_patients = num_patients
        self._members: list[torch.Tensor] = list(torch.split(order, counts.tolist()))

    def __len__(self) -> int:
        return self._num_patients

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        members = self._members[index]
        pick = int(members[int(torch.randint(len(members), (1,)))])
        return self._item(pick)

    def _item(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class PatientRecordDataset(PerPatientDataset):
    """One record per PATIENT (the unit of privacy).

    ``__getitem__(i)`` returns ``(image [1, S, S], label)`` of one image of patient ``i``,
    drawn uniformly at random with the torch RNG, so adding or removing a patient changes
    exactly one record and patient-level DP-SGD bounds each patient's contribution by one
    clipped gradient per step. ``len()`` is the number of patients.
    """

    def __init__(self, split: SplitArrays) -> None:
        self.split = split
        super().__init__(split.patient_index, split.num_patients)

    def _item(self, pick: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.images[pick], self.split.labels[pick]


@dataclass(frozen=True, eq=False)
class NodeData:
    """Everything a node trains and evaluates on.

    Attributes
    ----------
    report : IngestionReport
        The scan report (local).
    fingerprint : str
        Dataset fingerprint for the privacy ledger (see ``DicomIndex.fingerprint``).
    image_size : int
        Side ``S`` of the preprocessed images.
    train, val, test : SplitArrays
        Patient-disjoint splits (see :mod:`client.data.splits`).
    root : str
        The resolved data folder ("" when unknown): where a paradigm that also trains on the
        node's unlabelled patients reads them (:func:`client.data.task_data.load_unlabelled`).
    """

    report: IngestionReport
    fingerprint: str
    image_size: int
    train: SplitArrays
    val: SplitArrays
    test: SplitArrays
    root: str = ""

    @property
    def num_classes(self) -> int:
        """``1 + `` the largest label of any split (at least 2)."""
        labels = [s.labels for s in (self.train, self.val, self.test) if len(s)]
        top = max(int(t.max()) for t in labels) if labels else 0
        return max(top + 1, 2)


def _empty_split(image_size: int) -> SplitArrays:
    return SplitArrays(
        images=torch.zeros((0, 1, image_size, image_size), dtype=torch.float32),
        labels=torch.zeros((0,), dtype=torch.int64),
        patient_index=torch.zeros((0,), dtype=torch.int64),
        num_patients=0,
    )


def _build_split(
    patients: tuple[str, ...],
    records: dict[str, list[tuple[InstanceRecord, int]]],
    image_size: int,
) -> SplitArrays:
    transform = image_transform(image_size)
    images: list[torch.Tensor] = []
    labels: list[int] = []
    owners: list[int] = []
    kept = 0
    undecodable = 0
    for pid in patients:
        count = 0
        for rec, label in records[pid]:
            try:
                frames = image_frames(rec.path)
            except DataError:
                undecodable += 1  # counted, never named: a file name can identify a patient
                continue
            for pixels in frames:  # each frame is one image of the patient's study
                images.append(torch.as_tensor(transform(pixels), dtype=torch.float32))
                labels.append(label)
                owners.append(kept)
                count += 1
        if count:
            kept += 1
    if undecodable:
        logger.warning("%d image(s) could not be decoded and were left out; "
                       "`vesalius node check` lists which", undecodable)
    if not images:
        return _empty_split(image_size)
    return SplitArrays(
        images=torch.stack(images).contiguous(),
        labels=torch.tensor(labels, dtype=torch.int64),
        patient_index=torch.tensor(owners, dtype=torch.int64),
        num_patients=kept,
    )


def require_data_dir(root: Path) -> None:
    """Raise :class:`~common.errors.DataError` unless the node's data directory exists."""
    if not root.is_dir():
        raise DataError(
            f"data directory {root} does not exist",
            safe_reason="the node's data directory is missing",
        )


def build_patient_splits(
    by_patient: Mapping[str, object],
    build: Callable[[tuple[str, ...]], _SplitT],
    *,
    root: Path,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    what: str,
    unit: str,
    no_train_detail: str = "",
) -> dict[SplitName, _SplitT]:
    """Split the patients of ``by_patient`` by patient and build each split with ``build``.

    The assignment is :func:`client.data.splits.split_patients`'s, so a patient lands in the
    same split whichever loader (classification, segmentation) reads the folder.

    Parameters
    ----------
    by_patient : Mapping
        (0010,0020) Patient ID -> that patient's usable records; only the keys are used.
    build : callable
        ``build(patient_ids)`` returns the preprocessed split of those patients.
    root : Path
        The node's data directory (named in the error).
    seed : int
        Seed of the patient-level split.
    val_fraction, test_fraction : float
        Expected proportions of patients in validation and test.
    what, unit : str
        For the log line: the kind of data (``"node data"``) and what a split counts
        (``"images"``).
    no_train_detail : str
        Appended to the local error message when the training split is empty.

    Returns
    -------
    dict
        Split name -> built split, for every name of :data:`client.data.splits.SPLIT_NAMES`.

    Raises
    ------
    DataError
        The training split has no patient.
    """
    splits = split_patients(
        by_patient, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    arrays = {name: build(splits.of(name)) for name in SPLIT_NAMES}
    if arrays["train"].num_patients == 0:
        raise DataError(
            f"the training split of {root} has no patient{no_train_detail}",
            safe_reason="the node's training split has no patient",
        )
    logger.info(
        "%s: %s patients, %s %s (train/val/test)",
        what,
        "/".join(str(arrays[n].num_patients) for n in SPLIT_NAMES),
        "/".join(str(len(arrays[n])) for n in SPLIT_NAMES),
        unit,
    )
    return arrays


def _labelled_records(
    index: DicomIndex, labels: dict[tuple[str, str], int]
) -> dict[str, list[tuple[InstanceRecord, int]]]:
    out: dict[str, list[tuple[InstanceRecord, int]]] = {}
    for rec in index.instances():
        label = labels.get((rec.patient_id, rec.study_instance_uid))
        if label is not None:
            out.setdefault(rec.patient_id, []).append((rec, label))
    return out


def _dir_signature(root: Path) -> tuple[tuple[str, int, int], ...]:
    sig: list[tuple[str, int, int]] = []
    for path, rel in iter_data_files(root):
        st = path.stat()
        sig.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(sig)


_cache: OrderedDict[Hashable, NodeData] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every cached :class:`NodeData` (tests, or after the data changed in place)."""
    with _cache_lock:
        _cache.clear()
    from client.data import task_data  # imported here: it imports this module

    with task_data._cache_lock:
        task_data._cache.clear()
        task_data._unlabelled_cache.clear()


def load_node_data(
    data_dir: str | Path,
    *,
    image_size: int = 32,
    require_deidentified: bool = True,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    progress: Callable[[int, int], None] | None = None,
) -> NodeData:
    """Scan, label, split and preprocess a node's DICOM data.

    The scan accepts colour images, and every frame of a file is one image: see
    :mod:`client.data.frames` (greyscale single-frame files read exactly as before).

    Results are cached in-process (Flower recreates the ClientApp for every message) under
    the resolved directory, the arguments and a signature of the directory (sorted
    relative path, size and mtime of every file), so any file change forces a reload.

    Parameters
    ----------
    data_dir : str | Path
        The node's data directory, with ``labels.csv`` at its top.
    image_size : int, keyword-only
        Side ``S`` of the preprocessed images in pixels.
    require_deidentified : bool, keyword-only
        Skip files failing the de-identification check (see :mod:`client.dicom.phi`).
    seed : int, keyword-only
        Seed of the patient-level split.
    val_fraction, test_fraction : float, keyword-only
        Expected proportions of patients in validation and test.
    progress : Callable[[int, int], None] | None, keyword-only
        Called as ``progress(done, total)`` while scanning (not called on a cache hit).

    Raises
    ------
    DataError
        No usable labelled image, or no patient in the training split.
    """
    root = Path(data_dir).resolve()
    require_data_dir(root)
    key = (
        str(root),
        image_size,
        require_deidentified,
        seed,
        val_fraction,
        test_fraction,
        _dir_signature(root),
    )
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    data = _load(
        root, image_size, require_deidentified, seed, val_fraction, test_fraction, progress
    )
    with _cache_lock:
        _cache[key] = data
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return data


def _load(
    root: Path,
    image_size: int,
    require_deidentified: bool,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    progress: Callable[[int, int], None] | None,
) -> NodeData:
    outcome = scan_for_training(root, require_deidentified=require_deidentified,
                                progress=progress)
    index = DicomIndex.from_records(outcome.records)
    labels = read_labels(root / LABELS_FILENAME)
    report = build_report(files_seen=outcome.files_seen, skipped=outcome.skipped, index=index,
                          labels=labels, require_deidentified=require_deidentified)
    labelled = _labelled_records(index, labels)
    if not labelled:
        raise DataError(
            f"no usable labelled image under {root}: {report.files_used} usable files, "
            f"label counts {dict(report.label_counts)}",
            safe_reason="the node has no usable labelled image",
        )
    arrays = build_patient_splits(
        labelled,
        lambda patients: _build_split(patients, labelled, image_size),
        root=root,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        what="node data",
        unit="images",
        no_train_detail=f" ({len(labelled)} labelled patients)",
    )
    return NodeData(
        report=report,
        fingerprint=report.fingerprint,
        image_size=image_size,
        train=arrays["train"],
        val=arrays["val"],
        test=arrays["test"],
        root=str(root),
    )
