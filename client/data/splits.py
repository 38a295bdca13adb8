"""Deterministic patient-level train / validation / test assignment.

Each patient gets a number ``u`` in [0, 1) from SHA-256 of ``(seed, patient_id)``; the
patient is in *test* when ``u < test_fraction``, in *val* when
``u < test_fraction + val_fraction``, otherwise in *train*. The assignment of a patient
depends only on its own ID and the seed, so

* splits are patient-disjoint by construction (a patient has exactly one ``u``);
* adding or removing other patients never moves a patient to another split;
* fractions are expected proportions, not exact counts (small nodes vary).

:func:`assign_fold` uses the same ``u`` for k-fold cross-validation folds.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

SplitName = Literal["train", "val", "test"]
SPLIT_NAMES: tuple[SplitName, ...] = ("train", "val", "test")


def patient_uniform(patient_id: str, *, seed: int) -> float:
    """Map ``(seed, patient_id)`` to a uniform number in [0, 1) via SHA-256 (first 64 bits)."""
    digest = hashlib.sha256(f"vesalius-split\x1f{seed}\x1f{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def _check_fractions(val_fraction: float, test_fraction: float) -> None:
    if not (0.0 <= val_fraction < 1.0 and 0.0 <= test_fraction < 1.0):
        raise ValueError(
            f"val_fraction and test_fraction must be in [0, 1), got {val_fraction}, {test_fraction}"
        )
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            "val_fraction + test_fraction must be < 1 so that training keeps patients, "
            f"got {val_fraction} + {test_fraction}"
        )


def assign_split(
    patient_id: str, *, seed: int, val_fraction: float = 0.15, test_fraction: float = 0.15
) -> SplitName:
    """Return the split of one patient (see the module docstring for the rule)."""
    _check_fractions(val_fraction, test_fraction)
    u = patient_uniform(patient_id, seed=seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


@dataclass(frozen=True)
class PatientSplits:
    """Patient IDs per split, each tuple sorted."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def of(self, name: SplitName) -> tuple[str, ...]:
        """Return the patients of split ``name``."""
        return {"train": self.train, "val": self.val, "test": self.test}[name]


def split_patients(
    patient_ids: Iterable[str],
    *,
    seed: int,
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
) -> PatientSplits:
    """Assign every distinct patient ID to train, val or test.

    Parameters
    ----------
    patient_ids : Iterable[str]
        (0010,0020) Patient IDs; duplicates are ignored.
    seed : int, keyword-only
        Changes the whole assignment; fixed per federation run.
    val_fraction, test_fraction : float, keyword-only
        Expected proportions of patients in validation and test; their sum must be < 1.
    """
    _check_fractions(val_fraction, test_fraction)
    groups: dict[SplitName, list[str]] = {name: [] for name in SPLIT_NAMES}
    for pid in sorted(set(patient_ids)):
        split = assign_split(
            pid, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
        groups[split].append(pid)
    return PatientSplits(
        train=tuple(groups["train"]), val=tuple(groups["val"]), test=tuple(groups["test"])
    )


def assign_fold(patient_id: str, *, num_folds: int, seed: int) -> int:
    """Return the cross-validation fold (0..num_folds-1) of a patient, stable like splits."""
    if num_folds < 1:
        raise ValueError(f"num_folds must be >= 1, got {num_folds}")
    return min(int(patient_uniform(patient_id, seed=seed) * num_folds), num_folds - 1)
