"""The node's privacy ledger: append-only, hash-chained, Ed25519-signed, auditable.

One :class:`LedgerEntry` per release of information derived from a dataset (a training
round, an evaluation metric, a statistics query) records the dataset fingerprint, the run,
fold and round, the :class:`Mechanism` with its parameters, delta and the time. Budgets are
kept per dataset (fingerprint) across all runs and folds: :meth:`Ledger.spend` composes every
patient-level entry of a dataset at the smallest delta any of them recorded (conservative).
Hospital-level (client-level DP) entries are composed and reported separately, never mixed
with patient-level ones.

Auditors use :func:`verify_ledger` (chain, signatures, torn tail, epsilon recomputed with
Google's dp_accounting) and :func:`export_summary` (a signed summary for a review board).
"""

from __future__ import annotations

from common.ledger.accounting import (
    DEFAULT_TOLERANCE,
    epsilon_independent,
    epsilon_of,
    epsilons_agree,
)
from common.ledger.entry import LEVELS, LedgerEntry, LedgerRecord
from common.ledger.errors import LedgerError
from common.ledger.export import export_summary, verify_summary
from common.ledger.mechanism import KINDS, Mechanism
from common.ledger.store import Ledger, LedgerRead, Spend, TornTail
from common.ledger.verify import DatasetSummary, Problem, VerifyReport, verify_ledger

__all__ = [
    "DEFAULT_TOLERANCE",
    "KINDS",
    "LEVELS",
    "DatasetSummary",
    "Ledger",
    "LedgerEntry",
    "LedgerError",
    "LedgerRead",
    "LedgerRecord",
    "Mechanism",
    "Problem",
    "Spend",
    "TornTail",
    "VerifyReport",
    "epsilon_independent",
    "epsilon_of",
    "epsilons_agree",
    "export_summary",
    "verify_ledger",
    "verify_summary",
]
