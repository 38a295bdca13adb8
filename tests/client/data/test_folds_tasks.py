"""k-fold folds for every target kind: patient-level and disjoint; stratified for classes."""

from __future__ import annotations

from collections.abc import Callable
from typing import cast

import numpy as np
import pytest
import torch

from client.data.folds import (
    cv_splits,
    fold_assignment,
    patient_folds,
    patient_labels,
    stratified_folds,
    stratifies,
)
from client.data.node_data import NodeData, SplitArrays
from client.dicom.report import IngestionReport
from common.config import TrainPlan

SIZE = 4
K = 3


def _targets(task: str, rng: np.random.Generator, n: int) -> torch.Tensor:
    """Per-image targets of ``task``, as :func:`client.data.task_data.targets_tensor` makes them."""
    if task == "regression":
        return torch.as_tensor(rng.gamma(2.0, 5.0, n), dtype=torch.float32)
    if task == "multilabel":
        return torch.as_tensor(rng.random((n, K)) < 0.4, dtype=torch.int64)
    if task == "segmentation":
        return torch.as_tensor(rng.random((n, 1, SIZE, SIZE)) < 0.2, dtype=torch.int64)
    if task == "reconstruction":
        return torch.zeros(n, dtype=torch.int64)
    return torch.as_tensor(rng.integers(0, K if task != "binary" else 2, n), dtype=torch.int64)


def _split(task: str, rng: np.random.Generator, patients: int, first_code: int) -> SplitArrays:
    """Images constant at a unique patient code; 1-3 images per patient."""
    counts = rng.integers(1, 4, patients)
    owners = np.repeat(np.arange(patients), counts)
    images = torch.as_tensor(first_code + owners, dtype=torch.float32)[:, None, None, None]
    return SplitArrays(images=images.expand(-1, 1, SIZE, SIZE).contiguous(),
                       labels=_targets(task, rng, owners.size),
                       patient_index=torch.as_tensor(owners, dtype=torch.int64),
                       num_patients=patients)


def _node(task: str, seed: int = 0, sizes: tuple[int, int, int] = (30, 7, 9)) -> NodeData:
    rng = np.random.default_rng(seed)
    splits, code = [], 0
    for size in sizes:
        splits.append(_split(task, rng, size, code))
        code += size
    return NodeData(report=cast(IngestionReport, None), fingerprint="x", image_size=SIZE,
                    train=splits[0], val=splits[1], test=splits[2])


def _codes(split: SplitArrays) -> set[int]:
    return {int(v) for v in split.images[:, 0, 0, 0].unique()}


TASKS = ["binary", "multiclass", "ordinal", "multilabel", "regression", "segmentation",
         "reconstruction"]


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("num_folds", [2, 5])
def test_kfold_of_every_target_kind_is_patient_level_disjoint_and_covering(
        task: str, num_folds: int) -> None:
    # Prepare
    data = _node(task)
    everyone = set(range(46))
    # Execute
    held, trained = [], []
    for fold in range(num_folds):
        plan = TrainPlan(cv_mode="kfold", fold=fold, num_folds=num_folds, seed=9, task=task,
                         num_classes=2 if task in ("binary", "regression", "segmentation",
                                                   "reconstruction") else K)
        train, out = cv_splits(data, plan=plan, site_name="a")
        held.append(_codes(out)), trained.append(_codes(train))
        # Targets travel with their images, whatever their shape.
        assert tuple(out.labels.shape[1:]) == tuple(data.train.labels.shape[1:])
        assert out.labels.shape[0] == out.images.shape[0]
    # Assert: each patient is held out by exactly one fold and trains in all the others
    assert sum(len(h) for h in held) == len(everyone) and set().union(*held) == everyone
    for h, t in zip(held, trained, strict=True):
        assert not h & t and h | t == everyone
    sizes = [len(h) for h in held]
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize(("task", "expected"), [
    ("binary", True), ("multiclass", True), ("ordinal", True), ("multilabel", False),
    ("regression", False), ("segmentation", False), ("reconstruction", False),
    ("no-such-task", False)])
def test_only_class_and_grade_targets_are_stratified(task: str, expected: bool) -> None:
    assert stratifies(task) is expected


def test_ordinal_folds_are_stratified_by_grade() -> None:
    # Prepare: grades 0..2, one image per patient
    grades = np.random.default_rng(4).integers(0, K, 61)
    split = SplitArrays(images=torch.zeros((61, 1, SIZE, SIZE)),
                        labels=torch.as_tensor(grades, dtype=torch.int64),
                        patient_index=torch.arange(61), num_patients=61)
    # Execute
    folds = fold_assignment(split, task="ordinal", num_folds=4, seed=1)
    # Assert: every grade spreads over the folds within one patient
    np.testing.assert_array_equal(folds, stratified_folds(grades, num_folds=4, seed=1))
    for grade in range(K):
        per_fold = np.bincount(folds[grades == grade], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1


@pytest.mark.parametrize("make", [
    lambda rng: torch.as_tensor(rng.random(12), dtype=torch.float32),
    lambda rng: torch.as_tensor(rng.random((12, K)) < 0.5, dtype=torch.int64),
])
def test_patient_labels_refuses_targets_that_are_no_class(
        make: Callable[[np.random.Generator], torch.Tensor]) -> None:
    split = SplitArrays(images=torch.zeros((12, 1, SIZE, SIZE)),
                        labels=make(np.random.default_rng(0)),
                        patient_index=torch.arange(12), num_patients=12)
    with pytest.raises(ValueError, match="one integer label per image"):
        patient_labels(split)


def test_plain_patient_folds_do_not_depend_on_targets() -> None:
    # Two regression nodes with the same patients and different values get the same folds.
    a = _node("regression", seed=3)
    b = _node("regression", seed=3)
    b.train.labels.mul_(10.0)
    plan = TrainPlan(cv_mode="kfold", fold=1, num_folds=3, seed=2, task="regression")
    assert _codes(cv_splits(a, plan=plan, site_name="a")[1]) == \
        _codes(cv_splits(b, plan=plan, site_name="a")[1])
    np.testing.assert_array_equal(patient_folds(10, num_folds=3, seed=2),
                                  stratified_folds(np.zeros(10, np.int64), num_folds=3, seed=2))
