"""Node-side cross-validation folds: which patients a fold trains on and which it holds out.

Every node applies the coordinator's :class:`~common.config.TrainPlan` to its own data:

``cv_mode == "kfold"``
    All the node's patients (train, validation and test splits of
    :class:`~client.data.node_data.NodeData` together) are assigned to ``num_folds``
    *patient-level* folds. Where the task's target is a class or a grade (``binary``,
    ``multiclass``, ``ordinal``: :attr:`common.tasks.base.TargetKind.CLASS` / ``GRADE``) the
    folds are *stratified*: within each class, the class's patients, in their stable
    order, are permuted with a generator seeded by ``plan.seed`` and the class and dealt out
    round-robin; each class continues the deal where the previous one stopped, so fold sizes
    differ by at most one patient overall and by at most one patient of each class. For the
    other targets (multi-hot findings, real values, masks, the image itself) all patients form
    one stratum: one seeded permutation dealt round-robin (:func:`patient_folds`). Fold
    ``plan.fold`` is held out, the rest trains. The assignment depends only on the data and
    ``plan.seed`` -- never on ``plan.fold`` -- so the folds of one cross-validation are disjoint
    and cover every patient, and a patient's images never sit in two folds.
``cv_mode == "loso"``
    Leave one site out: the node named ``plan.holdout_site`` trains on nothing and holds out
    all its patients; every other node trains on all its patients and holds out nothing.
``cv_mode == "none"``
    The node's usual ``(train, val)`` splits.

A patient's class, for stratification, is the largest label among its images (binary tasks:
positive when any image is positive; ordinal tasks: its highest grade).

Stable order of patients: the train split, then validation, then test, each in
(0010,0020) Patient ID order, as :func:`~client.data.node_data.load_node_data` builds them
(its split seed is fixed per hospital, so this order never moves between runs).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from client.data.node_data import NodeData, SplitArrays
from common.config import TrainPlan
from common.errors import ConfigError
from common.tasks import get_task
from common.tasks.base import TargetKind

__all__ = [
    "concat_splits",
    "cv_splits",
    "empty_like",
    "fold_assignment",
    "patient_folds",
    "patient_labels",
    "stratified_folds",
    "stratifies",
    "subset_patients",
]


def empty_like(split: SplitArrays) -> SplitArrays:
    """A split with no patient and the same image shape as ``split``."""
    return SplitArrays(
        images=split.images[:0].clone(),
        labels=split.labels[:0].clone(),
        patient_index=split.patient_index[:0].clone(),
        num_patients=0,
    )


def concat_splits(splits: Sequence[SplitArrays]) -> SplitArrays:
    """Concatenate splits; patients of ``splits[i]`` are numbered after those of ``splits[:i]``.

    Raises
    ------
    ValueError
        ``splits`` is empty or their images differ in shape.
    """
    if not splits:
        raise ValueError("concat_splits needs at least one split")
    shapes = {tuple(s.images.shape[1:]) for s in splits}
    if len(shapes) != 1:
        raise ValueError(f"splits have different image shapes: {sorted(shapes)}")
    offsets = np.cumsum([0] + [s.num_patients for s in splits[:-1]])
    return SplitArrays(
        images=torch.cat([s.images for s in splits]).contiguous(),
        labels=torch.cat([s.labels for s in splits]),
        patient_index=torch.cat(
            [s.patient_index + int(off) for s, off in zip(splits, offsets, strict=True)]
        ),
        num_patients=int(sum(s.num_patients for s in splits)),
    )


def subset_patients(split: SplitArrays, patients: Sequence[int] | np.ndarray) -> SplitArrays:
    """The images of the given patients of ``split``, patients renumbered ``0..len-1``.

    Patients keep their relative order (the new number of a patient is its rank among
    ``patients`` sorted ascending); all images of a chosen patient are kept, none of the others.
    """
    chosen = np.unique(np.asarray(patients, dtype=np.int64))
    if chosen.size and (chosen[0] < 0 or chosen[-1] >= split.num_patients):
        raise ValueError(
            f"patient numbers must be in [0, {split.num_patients}), got {chosen.min()}..{chosen.max()}"
        )
    new_number = torch.full((split.num_patients,), -1, dtype=torch.int64)
    new_number[torch.as_tensor(chosen)] = torch.arange(chosen.size, dtype=torch.int64)
    mapped = new_number[split.patient_index] if len(split) else split.patient_index
    keep = mapped >= 0
    return SplitArrays(
        images=split.images[keep].contiguous(),
        labels=split.labels[keep],
        patient_index=mapped[keep],
        num_patients=int(chosen.size),
    )


def patient_labels(split: SplitArrays) -> np.ndarray:
    """Each patient's class: the largest label among its images (int64, one per patient).

    Raises
    ------
    ValueError
        The labels are not one integer class per image (multi-hot findings, real values or
        masks have no class: use :func:`patient_folds` for them), or a patient has no image.
    """
    if split.labels.ndim != 1 or split.labels.is_floating_point():
        raise ValueError("patient classes need one integer label per image, got labels of "
                         f"shape {tuple(split.labels.shape)} and dtype {split.labels.dtype}")
    out = np.full(split.num_patients, -1, dtype=np.int64)
    np.maximum.at(out, split.patient_index.numpy(), split.labels.numpy())
    if split.num_patients and int(out.min()) < 0:
        raise ValueError("every patient of a split must have at least one image")
    return out


def stratified_folds(labels: np.ndarray, *, num_folds: int, seed: int) -> np.ndarray:
    """Fold number (``0..num_folds-1``) of each patient, stratified by class.

    Parameters
    ----------
    labels : numpy.ndarray
        One class per patient, in the patients' stable order.
    num_folds : int
        Number of folds (>= 1).
    seed : int
        Seed of the per-class permutations (the cross-validation's seed, the same for all
        its folds).

    Returns
    -------
    numpy.ndarray
        int64 fold numbers, one per patient. Within each class, fold sizes differ by at most
        one; over all patients too.
    """
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    labels = np.asarray(labels, dtype=np.int64)
    folds = np.empty(labels.size, dtype=np.int64)
    start = 0  # where the round-robin deal continues, so that overall fold sizes stay even
    for cls in np.unique(labels):
        members = np.flatnonzero(labels == cls)  # stable order
        # numpy's Generator rather than hand-rolled shuffling; seeded per class so that adding
        # patients of one class does not reshuffle the other.
        rng = np.random.default_rng([int(seed) % 2**63, int(cls), 0x5F0D])
        order = members[rng.permutation(members.size)]
        folds[order] = (start + np.arange(order.size)) % num_folds
        start = (start + order.size) % num_folds
    return folds


def patient_folds(num_patients: int, *, num_folds: int, seed: int) -> np.ndarray:
    """Fold number of each of ``num_patients`` patients, without strata.

    One seeded permutation of the patients dealt round-robin (:func:`stratified_folds` with
    every patient in one stratum), so fold sizes differ by at most one patient. For targets
    that are no class: multi-hot findings, real values, masks, the image itself.
    """
    return stratified_folds(np.zeros(int(num_patients), dtype=np.int64),
                            num_folds=num_folds, seed=seed)


_STRATIFIED_TARGETS = (TargetKind.CLASS, TargetKind.GRADE)


def stratifies(task: str) -> bool:
    """Whether the k-fold folds of ``task`` are stratified (its target is a class or a grade).

    An unknown task name is not stratified (its folds are still patient-level); the node
    refuses an unknown task anyway when it loads its data.
    """
    try:
        target = get_task(task).info.target
    except ConfigError:  # an unknown task: plain folds (the data loader refuses it)
        return False
    return target in _STRATIFIED_TARGETS


def fold_assignment(split: SplitArrays, *, task: str, num_folds: int, seed: int) -> np.ndarray:
    """Fold number of each patient of ``split`` for a k-fold of ``task``.

    Stratified by the patient's class (:func:`patient_labels`, :func:`stratified_folds`) where
    :func:`stratifies` says so, else :func:`patient_folds`.
    """
    if stratifies(task):
        return stratified_folds(patient_labels(split), num_folds=num_folds, seed=seed)
    return patient_folds(split.num_patients, num_folds=num_folds, seed=seed)


def _all_patients(data: NodeData) -> SplitArrays:
    return concat_splits([data.train, data.val, data.test])


def cv_splits(data: NodeData, *, plan: TrainPlan, site_name: str) -> tuple[SplitArrays, SplitArrays]:
    """Return ``(train, heldout)`` of this node for ``plan`` (see the module docstring).

    Parameters
    ----------
    data : NodeData
        The node's loaded data.
    plan : TrainPlan
        The coordinator's plan: ``cv_mode``, ``fold``, ``num_folds``, ``holdout_site``,
        ``seed``.
    site_name : str
        This node's own site name (from its node config).

    Raises
    ------
    ConfigError
        Unknown ``cv_mode`` (plans are validated on construction, so only a bypassed check).
    """
    if plan.cv_mode == "none":
        return data.train, data.val
    everyone = _all_patients(data)
    if plan.cv_mode == "loso":
        if site_name == plan.holdout_site:
            return empty_like(everyone), everyone
        return everyone, empty_like(everyone)
    if plan.cv_mode == "kfold":
        folds = fold_assignment(everyone, task=plan.task, num_folds=plan.num_folds,
                                seed=plan.seed)
        held = np.flatnonzero(folds == plan.fold)
        kept = np.flatnonzero(folds != plan.fold)
        return subset_patients(everyone, kept), subset_patients(everyone, held)
    raise ConfigError(
        f"unknown cv-mode {plan.cv_mode!r}", safe_reason="malformed plan: unknown cv-mode"
    )
