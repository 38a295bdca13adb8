"""Node-side cross-validation folds: patient-level, stratified, disjoint, deterministic."""

from __future__ import annotations

from typing import cast

import numpy as np
import pytest
import torch

from client.data.folds import (
    concat_splits,
    cv_splits,
    patient_labels,
    stratified_folds,
    subset_patients,
)
from client.data.node_data import NodeData, SplitArrays
from client.dicom.report import IngestionReport
from common.config import TrainPlan

SIZE = 4


def _split(labels: list[int], images_per_patient: list[int], first_value: int) -> SplitArrays:
    """A split whose images are constant, equal to a unique patient code (to track patients)."""
    imgs, labs, owners = [], [], []
    for p, (label, count) in enumerate(zip(labels, images_per_patient, strict=True)):
        for _ in range(count):
            imgs.append(torch.full((1, SIZE, SIZE), float(first_value + p)))
            labs.append(label)
            owners.append(p)
    return SplitArrays(
        images=torch.stack(imgs) if imgs else torch.zeros((0, 1, SIZE, SIZE)),
        labels=torch.tensor(labs, dtype=torch.int64),
        patient_index=torch.tensor(owners, dtype=torch.int64),
        num_patients=len(labels),
    )


def _node(seed: int = 0, n: tuple[int, int, int] = (30, 7, 8), pos_rate: float = 0.3) -> NodeData:
    rng = np.random.default_rng(seed)
    splits = []
    code = 0
    for size in n:
        labels = (rng.random(size) < pos_rate).astype(int).tolist()
        counts = rng.integers(1, 4, size).tolist()
        splits.append(_split(labels, counts, code))
        code += size
    return NodeData(report=cast(IngestionReport, None), fingerprint="x", image_size=SIZE,
                    train=splits[0], val=splits[1], test=splits[2])


def _codes(split: SplitArrays) -> dict[int, int]:
    """Patient code -> number of images, checking each patient's images share one code."""
    out: dict[int, int] = {}
    for p in range(split.num_patients):
        vals = split.images[split.patient_index == p][:, 0, 0, 0]
        assert vals.numel() > 0 and bool((vals == vals[0]).all())
        out[int(vals[0])] = int(vals.numel())
    return out


def _kfold(fold: int, k: int = 5, seed: int = 42) -> TrainPlan:
    return TrainPlan(cv_mode="kfold", fold=fold, num_folds=k, seed=seed)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_kfold_heldout_folds_are_disjoint_cover_everyone_and_never_split_a_patient(k: int) -> None:
    # Prepare
    data = _node()
    everyone = _codes(concat_splits([data.train, data.val, data.test]))
    # Execute
    parts = [cv_splits(data, plan=_kfold(f, k), site_name="a") for f in range(k)]
    # Assert
    held = [_codes(h) for _, h in parts]
    union: dict[int, int] = {}
    for h in held:
        assert not set(h) & set(union)  # disjoint
        union.update(h)
    assert union == everyone  # every patient, with all its images
    for (train, _), h in zip(parts, held, strict=True):
        t = _codes(train)
        assert not set(t) & set(h) and {**t, **h} == everyone


def test_kfold_is_stratified_per_class_and_balanced_overall() -> None:
    data = _node(seed=3, n=(61, 11, 9), pos_rate=0.27)
    labels = patient_labels(concat_splits([data.train, data.val, data.test]))
    k = 5
    held = [cv_splits(data, plan=_kfold(f, k), site_name="a")[1] for f in range(k)]
    pos = [int(patient_labels(h).sum()) for h in held]
    neg = [h.num_patients - p for h, p in zip(held, pos, strict=True)]
    assert sum(pos) == int(labels.sum())
    assert max(pos) - min(pos) <= 1 and max(neg) - min(neg) <= 1
    sizes = [h.num_patients for h in held]
    assert max(sizes) - min(sizes) <= 1
    for p, h in zip(pos, held, strict=True):  # class proportion of each fold within +-1 patient
        assert abs(p - h.num_patients * labels.mean()) <= 1


def test_kfold_is_deterministic_by_seed_and_changes_with_it() -> None:
    data = _node()
    a = _codes(cv_splits(data, plan=_kfold(1, seed=7), site_name="a")[1])
    b = _codes(cv_splits(data, plan=_kfold(1, seed=7), site_name="a")[1])
    c = _codes(cv_splits(data, plan=_kfold(1, seed=8), site_name="a")[1])
    assert a == b and a != c


def test_stratified_folds_counts_match_numpy_split_of_each_class() -> None:
    labels = np.array([0] * 13 + [1] * 6)
    folds = stratified_folds(labels, num_folds=4, seed=1)
    for cls in (0, 1):
        counts = np.bincount(folds[labels == cls], minlength=4)
        expected = sorted(len(a) for a in np.array_split(np.arange((labels == cls).sum()), 4))
        assert sorted(counts.tolist()) == expected


def test_patient_class_is_its_largest_image_label() -> None:
    split = SplitArrays(images=torch.zeros((4, 1, SIZE, SIZE)), labels=torch.tensor([0, 1, 0, 0]),
                        patient_index=torch.tensor([0, 0, 1, 1]), num_patients=2)
    assert patient_labels(split).tolist() == [1, 0]


def test_loso_holdout_site_holds_out_everyone_and_others_train_on_everyone() -> None:
    data = _node()
    total = data.train.num_patients + data.val.num_patients + data.test.num_patients
    plan = TrainPlan(cv_mode="loso", fold=1, num_folds=3, holdout_site="b")
    train_b, held_b = cv_splits(data, plan=plan, site_name="b")
    train_a, held_a = cv_splits(data, plan=plan, site_name="a")
    assert train_b.num_patients == 0 and len(train_b) == 0 and held_b.num_patients == total
    assert held_a.num_patients == 0 and len(held_a) == 0 and train_a.num_patients == total
    assert tuple(held_a.images.shape[1:]) == (1, SIZE, SIZE)


def test_no_cv_returns_the_usual_train_and_validation_splits() -> None:
    data = _node()
    train, held = cv_splits(data, plan=TrainPlan(), site_name="a")
    assert train is data.train and held is data.val


def test_subset_renumbers_patients_in_order_and_rejects_unknown_ones() -> None:
    split = _split([0, 1, 0, 1], [2, 1, 3, 1], first_value=100)
    sub = subset_patients(split, [3, 1])
    assert sub.num_patients == 2 and sub.patient_index.tolist() == [0, 1]
    assert _codes(sub) == {101: 1, 103: 1}
    with pytest.raises(ValueError, match="patient numbers"):
        subset_patients(split, [4])
