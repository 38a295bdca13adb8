"""Fixtures for ledger tests: a small signed ledger with entries of two datasets."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from common.ledger import Ledger, LedgerEntry, Mechanism

FP_A = "a" * 64
FP_B = "b" * 64
DELTA = 1e-5


def dp_sgd(sigma: float = 1.1, q: float = 0.05, steps: int = 20) -> Mechanism:
    """A subsampled-Gaussian mechanism (DP-SGD round)."""
    return Mechanism("subsampled-gaussian", noise_multiplier=sigma, sample_rate=q, steps=steps)


def entry(
    fingerprint: str = FP_A,
    mechanism: Mechanism | None = None,
    *,
    run_id: str = "run-1",
    round: int | None = 1,
    level: str = "patient",
    release: str = "train",
    epsilon_reported: float | None = None,
) -> LedgerEntry:
    """A ledger entry with sensible defaults."""
    return LedgerEntry(
        fingerprint=fingerprint,
        run_id=run_id,
        release=release,
        mechanism=mechanism or dp_sgd(),
        delta=DELTA,
        dataset_size=200,
        round=round,
        level=level,
        epsilon_reported=epsilon_reported,
        params={"max_grad_norm": 1.0, "local_epochs": 1, "model": "cnn"},
    )


@pytest.fixture
def make_ledger(tmp_path: Path) -> Callable[..., Ledger]:
    """Return ``make(n)``: a ledger under tmp_path/node with ``n`` entries (two datasets)."""

    def make(n: int = 4, mechanism: Mechanism | None = None) -> Ledger:
        ledger = Ledger(tmp_path / "node" / "ledger" / "ledger.jsonl")
        for i in range(n):
            fp = FP_A if i % 2 == 0 else FP_B
            ledger.append(entry(fp, mechanism, round=i + 1))
        return ledger

    return make
