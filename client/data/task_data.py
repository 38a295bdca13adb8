"""A node's data for any task: 2D images, 3D volumes or series, with the task's targets.

:func:`load_task_data` is what the ClientApp reads for a plan (``task``, ``num-classes``,
``samples``). It returns the same :class:`~client.data.node_data.NodeData` as the binary
loader, whose :class:`~client.data.node_data.SplitArrays` hold, per sample:

========================  =======================  =========================================
task                      ``labels``               sample (``images``)
========================  =======================  =========================================
binary, multiclass        int64 ``[N]`` class      ``[1, S, S]`` image or ``[1, S, S, S]``
ordinal                   int64 ``[N]`` grade      volume (``samples`` "volume-3d" or
multilabel                int64 ``[N, K]`` 0/1     "series": one study's series assembled
regression                float32 ``[N]`` value    along its slice normal, resampled to a
reconstruction            int64 ``[N]`` zeros      cube of side ``S``)
segmentation              int64 ``[N, S, S]`` mask ``[1, S, S]`` image (2D slices only)
========================  =======================  =========================================

* What one file gives: :mod:`client.data.frames`. The scan accepts colour images (RGB,
  YBR, palette), reduced to BT.601 luma because the zoo's models take one channel; every
  frame of a multi-frame file is one 2D image; greyscale single-frame files read exactly
  as :func:`client.dicom.pixels.read_pixels` always did.
* ``binary`` and ``multiclass`` on 2D images go through :func:`client.data.node_data.
  load_node_data` unchanged.
* Targets come from ``labels.csv`` (:func:`client.data.labels.read_targets`: the task's
  column, every row checked); ``reconstruction`` needs no labels file and uses every usable
  study a node holds, labelled or not.
* Volumes: the usable instances of one study are grouped into series and assembled by
  :func:`client.dicom.volume.assemble_volumes` (sorted along the normal of (0020,0037) Image
  Orientation (Patient) by (0020,0032) Image Position (Patient); series with gaps, mixed
  orientations or inconsistent spacing are refused there and counted here). The study's
  longest assembled series is its sample; it is resampled to ``S x S x S`` with MONAI's
  ``Resize`` (area averaging; the aspect ratio is not kept, as for 2D images) and scaled to
  [0, 1] by the same robust percentiles as 2D images (:class:`client.data.transforms.
  RobustScale`). A study with no assembled single-frame series uses the frames of its
  multi-frame file with most frames (e.g. an enhanced CT or MR image) as the volume: frames
  are assumed parallel slices, sorted by their per-frame (0020,0032) Image Position
  (Patient) when the file has one for every frame, else kept in stored order
  (:func:`client.data.frames.volume_frames`).
* ``segmentation`` reads images paired with their masks (:func:`client.data.segmentation.
  load_segmentation_data`).

The unit of privacy stays the patient: the splits are patient-level
(:func:`client.data.node_data.build_patient_splits`) and the training dataset exposes one
record per patient (:class:`~client.data.node_data.PatientRecordDataset`).
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Hashable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import Resize

from client.data.frames import image_frames, scan_for_training, volume_frames
from client.data.labels import LABELS_FILENAME, Target, read_labels, read_targets
from client.data.node_data import (
    CACHE_SIZE,
    NodeData,
    SplitArrays,
    _dir_signature,
    build_patient_splits,
    load_node_data,
    require_data_dir,
)
from client.data.transforms import RobustScale, image_transform
from client.dicom.index import DicomIndex, InstanceRecord
from client.dicom.report import build_report
from client.dicom.scan import scan_directory
from client.dicom.volume import assemble_volumes
from common.errors import ConfigError, DataError

__all__ = ["load_task_data", "load_unlabelled", "targets_tensor"]

logger = logging.getLogger(__name__)

StudyKey = tuple[str, str]
_Study = tuple[StudyKey, list[InstanceRecord], Target]

_cache: OrderedDict[Hashable, NodeData] = OrderedDict()
_cache_lock = threading.Lock()


def targets_tensor(task: str, targets: list[Target], num_classes: int) -> torch.Tensor:
    """The ``labels`` tensor of a split for ``task`` (see the module docstring)."""
    if task == "regression":
        return torch.tensor([float(t) for t in targets], dtype=torch.float32)  # type: ignore[arg-type]
    if task == "multilabel":
        hot = torch.zeros((len(targets), num_classes), dtype=torch.int64)
        for row, findings in enumerate(targets):
            for finding in findings:  # type: ignore[union-attr]
                hot[row, int(finding)] = 1
        return hot
    return torch.tensor([int(t) for t in targets], dtype=torch.int64)  # type: ignore[arg-type]


def _empty(task: str, samples: str, image_size: int, num_classes: int) -> SplitArrays:
    dims = 3 if samples != "image-2d" else 2
    return SplitArrays(
        images=torch.zeros((0, 1, *([image_size] * dims)), dtype=torch.float32),
        labels=targets_tensor(task, [], num_classes),
        patient_index=torch.zeros((0,), dtype=torch.int64),
        num_patients=0,
    )


def _multi_frame_volume(records: list[InstanceRecord]) -> npt.NDArray[np.float32] | None:
    """The frames of the study's multi-frame file with most frames, or None.

    Files are tried by decreasing (0028,0008) Number of Frames (ties by relative path); the
    first that decodes is the volume (see :func:`client.data.frames.volume_frames`).
    """
    candidates = sorted((rec for rec in records if rec.number_of_frames > 1),
                        key=lambda rec: (-rec.number_of_frames, rec.relpath))
    for rec in candidates:
        try:
            return volume_frames(rec.path)
        except DataError:
            continue
    return None


def _volume(records: list[InstanceRecord], image_size: int) -> torch.Tensor | None:
    """The study's volume as ``[1, S, S, S]`` in [0, 1], or None.

    The longest assembled single-frame series; when none assembles, the frames of one
    multi-frame file (:func:`_multi_frame_volume`).
    """
    outcome = assemble_volumes([rec.path for rec in records])
    if outcome.volumes:
        array = max(outcome.volumes, key=lambda v: v.array.shape[0]).array
    else:
        found = _multi_frame_volume(records)
        if found is None:
            return None
        array = found
    cube = Resize((image_size,) * 3, mode="area")(array[np.newaxis])
    scaled = RobustScale()(torch.as_tensor(np.asarray(cube), dtype=torch.float32))
    return torch.as_tensor(scaled, dtype=torch.float32).contiguous()


def _build_split(
    patients: tuple[str, ...], studies: dict[str, list[_Study]], *, task: str, samples: str,
    image_size: int, num_classes: int,
) -> SplitArrays:
    transform = image_transform(image_size)
    images: list[torch.Tensor] = []
    targets: list[Target] = []
    owners: list[int] = []
    kept = skipped = 0
    for pid in patients:
        count = 0
        for _key, records, target in studies[pid]:
            if samples == "image-2d":
                for rec in records:
                    try:
                        frames = image_frames(rec.path)
                    except DataError:
                        skipped += 1  # counted, never named: a file name can identify
                        continue
                    for pixels in frames:  # one image per frame (client.data.frames)
                        images.append(torch.as_tensor(transform(pixels), dtype=torch.float32))
                        targets.append(target)
                        owners.append(kept)
                        count += 1
            else:
                cube = _volume(records, image_size)
                if cube is None:
                    skipped += 1
                    continue
                images.append(cube)
                targets.append(target)
                owners.append(kept)
                count += 1
        if count:
            kept += 1
    if skipped:
        logger.warning("%d %s could not be read and were left out; `vesalius node check` "
                       "says why", skipped, "image(s)" if samples == "image-2d" else "study series")
    if not images:
        return _empty(task, samples, image_size, num_classes)
    return SplitArrays(
        images=torch.stack(images).contiguous(),
        labels=targets_tensor(task, targets, num_classes),
        patient_index=torch.tensor(owners, dtype=torch.int64),
        num_patients=kept,
    )


def _segmentation(root: Path, *, image_size: int, require_deidentified: bool, seed: int,
                  val_fraction: float, test_fraction: float) -> NodeData:
    from client.data.segmentation import load_segmentation_data

    seg = load_segmentation_data(root, image_size=image_size, seed=seed,
                                 require_deidentified=require_deidentified,
                                 val_fraction=val_fraction, test_fraction=test_fraction)
    outcome = scan_directory(root, require_deidentified=require_deidentified,
                             exclude=(LABELS_FILENAME,))
    report = build_report(files_seen=outcome.files_seen, skipped=outcome.skipped,
                          index=DicomIndex.from_records(outcome.records), labels={},
                          require_deidentified=require_deidentified)

    def arrays(part: object) -> SplitArrays:
        return SplitArrays(images=part.images,  # type: ignore[attr-defined]
                           labels=part.masks.long(),  # type: ignore[attr-defined]
                           patient_index=part.patient_index,  # type: ignore[attr-defined]
                           num_patients=part.num_patients)  # type: ignore[attr-defined]

    return NodeData(report=report, fingerprint=seg.fingerprint, image_size=image_size,
                    train=arrays(seg.train), val=arrays(seg.val), test=arrays(seg.test),
                    root=str(root))


def _studies(index: DicomIndex, targets: dict[StudyKey, Target] | None) -> dict[str, list[_Study]]:
    """Patient -> its studies ``(key, records, target)``; every study when ``targets`` is None."""
    grouped: dict[StudyKey, list[InstanceRecord]] = {}
    for rec in index.instances():
        grouped.setdefault((rec.patient_id, rec.study_instance_uid), []).append(rec)
    out: dict[str, list[_Study]] = {}
    for key, records in sorted(grouped.items()):
        target: Target | None = 0 if targets is None else targets.get(key)
        if target is not None:
            out.setdefault(key[0], []).append((key, records, target))
    return out


def _load(root: Path, *, task: str, num_classes: int, samples: str, image_size: int,
          require_deidentified: bool, seed: int, val_fraction: float,
          test_fraction: float) -> NodeData:
    if task == "segmentation":
        if samples != "image-2d":
            raise ConfigError(
                "segmentation federations read 2D image/mask pairs",
                safe_reason="refused: the segmentation task reads 2D slices (samples image-2d)")
        return _segmentation(root, image_size=image_size,
                             require_deidentified=require_deidentified, seed=seed,
                             val_fraction=val_fraction, test_fraction=test_fraction)
    outcome = scan_for_training(root, require_deidentified=require_deidentified)
    index = DicomIndex.from_records(outcome.records)
    targets = (None if task == "reconstruction"
               else read_targets(root / LABELS_FILENAME, task, num_classes))
    studies = _studies(index, targets)
    counted = {key: t for key, t in (targets or {}).items() if isinstance(t, int)}
    report = build_report(files_seen=outcome.files_seen, skipped=outcome.skipped, index=index,
                          labels=counted, require_deidentified=require_deidentified)
    if not studies:
        what = "usable image" if task == "reconstruction" else f"usable study with a {task} target"
        raise DataError(f"no {what} under {root} ({report.files_used} usable files)",
                        safe_reason=f"the node has no {what}")
    arrays = build_patient_splits(
        studies,
        lambda patients: _build_split(patients, studies, task=task, samples=samples,
                                      image_size=image_size, num_classes=num_classes),
        root=root, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        what=f"{task} data", unit="images" if samples == "image-2d" else "volumes",
        no_train_detail=f" ({len(studies)} patients)",
    )
    return NodeData(report=report, fingerprint=report.fingerprint, image_size=image_size,
                    train=arrays["train"], val=arrays["val"], test=arrays["test"],
                    root=str(root))


def load_task_data(
    data_dir: str | Path,
    *,
    task: str = "binary",
    num_classes: int = 2,
    samples: str = "image-2d",
    image_size: int = 32,
    require_deidentified: bool = True,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> NodeData:
    """Scan, label, split and preprocess a node's data for ``task`` (see the module docstring).

    Results are cached in-process under the arguments and a signature of the directory
    (every file's relative path, size and modification time), as
    :func:`client.data.node_data.load_node_data` does.

    Raises
    ------
    DataError
        The folder is missing, the labels CSV has a problem for the task, nothing usable is
        labelled, or the training split is empty.
    ConfigError
        A sample kind the task cannot read (segmentation of volumes).
    """
    if task in ("binary", "multiclass") and samples == "image-2d":
        return load_node_data(data_dir, image_size=image_size,
                              require_deidentified=require_deidentified, seed=seed,
                              val_fraction=val_fraction, test_fraction=test_fraction)
    root = Path(data_dir).resolve()
    require_data_dir(root)
    key = (str(root), task, num_classes, samples, image_size, require_deidentified, seed,
           val_fraction, test_fraction, _dir_signature(root))
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    data = _load(root, task=task, num_classes=num_classes, samples=samples,
                 image_size=image_size, require_deidentified=require_deidentified, seed=seed,
                 val_fraction=val_fraction, test_fraction=test_fraction)
    with _cache_lock:
        _cache[key] = data
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return data


def load_unlabelled(
    data_dir: str | Path,
    *,
    task: str = "binary",
    num_classes: int = 2,
    samples: str = "image-2d",
    image_size: int = 32,
    require_deidentified: bool = True,
    seed: int = 0,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> SplitArrays:
    """The node's *unlabelled* training patients: what :func:`load_task_data` leaves out.

    Every loader trains on the patients with at least one usable labelled study (a study
    without a valid row of ``labels.csv`` is dropped; a patient with none is not in any
    split). This returns the patients with *no* labelled usable study whose patient-level
    split (:func:`client.data.splits.assign_split`, the same rule and seed as the labelled
    ones) is *train*, each image (or volume) one item, ``labels`` all 0 (unknown), in the
    layout of :class:`~client.data.node_data.SplitArrays`. The labelled splits, and so what a
    supervised run sees, are untouched. Cached in-process like :func:`load_task_data`.

    Raises
    ------
    DataError
        The folder is missing or the labels CSV has a problem for the task.
    """
    root = Path(data_dir).resolve()
    require_data_dir(root)
    key = ("unlabelled", str(root), task, num_classes, samples, image_size,
           require_deidentified, seed, val_fraction, test_fraction, _dir_signature(root))
    with _cache_lock:
        if key in _unlabelled_cache:
            return _unlabelled_cache[key]
    outcome = scan_for_training(root, require_deidentified=require_deidentified)
    index = DicomIndex.from_records(outcome.records)
    csv = root / LABELS_FILENAME
    labels: dict[StudyKey, Target] = (
        dict(read_labels(csv)) if task in ("binary", "multiclass") and samples == "image-2d"
        else read_targets(csv, task, num_classes))
    usable = {(rec.patient_id, rec.study_instance_uid) for rec in index.instances()}
    labelled = {pid for pid, study in labels if (pid, study) in usable}
    studies = {pid: found for pid, found in _studies(index, None).items()
               if pid not in labelled}
    from client.data.splits import split_patients

    patients = split_patients(studies, seed=seed, val_fraction=val_fraction,
                              test_fraction=test_fraction).train
    split = _build_split(patients, studies, task=task, samples=samples, image_size=image_size,
                         num_classes=num_classes)
    logger.info("unlabelled training patients: %d (%d %s)", split.num_patients, len(split),
                "images" if samples == "image-2d" else "volumes")
    with _cache_lock:
        _unlabelled_cache[key] = split
        while len(_unlabelled_cache) > CACHE_SIZE:
            _unlabelled_cache.popitem(last=False)
    return split


_unlabelled_cache: OrderedDict[Hashable, SplitArrays] = OrderedDict()
