"""Patient-level splits: disjoint, deterministic, stable when patients are added."""

from __future__ import annotations

import pytest

from client.data.splits import assign_fold, assign_split, patient_uniform, split_patients

PATIENTS = [f"PAT-{i:04d}" for i in range(400)]


def test_disjoint_and_complete_for_many_seeds() -> None:
    for seed in range(20):
        # Execute
        splits = split_patients(PATIENTS, seed=seed)
        # Assert
        train, val, test = set(splits.train), set(splits.val), set(splits.test)
        assert not (train & val) and not (train & test) and not (val & test)
        assert train | val | test == set(PATIENTS)


def test_deterministic_for_seed_and_changes_with_seed() -> None:
    # Execute
    a = split_patients(PATIENTS, seed=3)
    b = split_patients(list(reversed(PATIENTS)), seed=3)
    c = split_patients(PATIENTS, seed=4)
    # Assert
    assert a == b
    assert a != c


def test_patient_split_stable_when_patients_added() -> None:
    for seed in range(10):
        # Prepare
        before = split_patients(PATIENTS[:100], seed=seed)
        # Execute
        after = split_patients(PATIENTS, seed=seed)
        # Assert
        for name in ("train", "val", "test"):
            assert set(before.of(name)) <= set(after.of(name))  # type: ignore[arg-type]


def test_fractions_are_respected_on_average() -> None:
    # Execute
    patients = [f"p{i}" for i in range(20000)]
    splits = split_patients(patients, seed=0, val_fraction=0.2, test_fraction=0.1)
    # Assert
    n = 20000
    assert abs(len(splits.val) / n - 0.2) < 0.015
    assert abs(len(splits.test) / n - 0.1) < 0.015


def test_uniform_in_unit_interval_and_zero_fractions() -> None:
    # Execute
    values = [patient_uniform(p, seed=1) for p in PATIENTS]
    # Assert
    assert all(0.0 <= v < 1.0 for v in values)
    only_train = {assign_split(p, seed=1, val_fraction=0.0, test_fraction=0.0) for p in PATIENTS}
    assert only_train == {"train"}


@pytest.mark.parametrize(("val", "test"), [(-0.1, 0.1), (0.5, 0.5), (0.2, 1.0)])
def test_invalid_fractions_rejected(val: float, test: float) -> None:
    # Execute / Assert
    with pytest.raises(ValueError, match="fraction"):
        split_patients(PATIENTS, seed=0, val_fraction=val, test_fraction=test)


def test_folds_cover_range_and_are_stable() -> None:
    # Execute
    folds = [assign_fold(p, num_folds=5, seed=2) for p in PATIENTS]
    # Assert
    assert set(folds) == {0, 1, 2, 3, 4}
    assert folds == [assign_fold(p, num_folds=5, seed=2) for p in PATIENTS]
