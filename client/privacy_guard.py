"""The node's budget across runs and folds, backed by its privacy ledger.

:class:`NodeBudget` enforces the hospital's epsilon cap per **dataset** (fingerprint), over
every patient-level entry the ledger holds for it: all earlier rounds, runs and folds. A plan
is checked before any data is touched (:meth:`NodeBudget.check`), and every release is
charged (checked again, then appended) as it happens (:meth:`NodeBudget.charge`).

Hospital-level entries (client-level DP of the federation) are recorded in the same ledger
but never counted against the patient-level cap: the two guarantees protect different units
and do not compose.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from common.config import NodeConfig
from common.errors import BudgetExceededError, PrivacyConfigError
from common.ledger import Ledger, LedgerEntry, LedgerRecord, Mechanism, Spend, epsilon_of
from common.privacy.accountant import AccountantState
from common.privacy.display import epsilon_text

__all__ = ["CAP_TOLERANCE", "NodeBudget"]

log = logging.getLogger(__name__)

CAP_TOLERANCE = 1e-6
"""A plan may exceed the cap by this much (planner round-off)."""


class NodeBudget:
    """A dataset-level epsilon cap enforced from the node's ledger.

    Parameters
    ----------
    ledger : Ledger
        The node's ledger.
    cap : float
        Largest patient-level epsilon (RDP, Opacus) any one dataset may spend in total; > 0.

    Raises
    ------
    PrivacyConfigError
        If ``cap`` is not a positive number.
    """

    def __init__(self, ledger: Ledger, *, cap: float) -> None:
        if not (isinstance(cap, (int, float)) and cap > 0 and cap == cap):
            raise PrivacyConfigError(f"epsilon cap must be a number > 0, got {cap!r}")
        self.ledger = ledger
        self.cap = float(cap)

    @classmethod
    def for_node(cls, node: NodeConfig) -> NodeBudget:
        """The budget of a node: its ledger (``node.ledger_path``) and its ``epsilon_cap``."""
        return cls(Ledger(node.ledger_path), cap=node.epsilon_cap)

    def spent(self, fingerprint: str, *, prv: bool = True) -> Spend:
        """Patient-level spend of a dataset so far (RDP and PRV; ``prv=False`` skips the slow
        PRV accountant and leaves ``epsilon_prv`` NaN)."""
        return self.ledger.spend(fingerprint, level="patient", prv=prv)

    def prior(self, fingerprint: str) -> AccountantState:
        """The dataset's past Gaussian events, to pass as ``prior`` to ``train_dp``."""
        return self.ledger.history(fingerprint)

    def check(self, fingerprint: str, planned: Sequence[Mechanism], *, delta: float) -> float:
        """Return the dataset's patient-level epsilon after ``planned``, or refuse.

        The past entries and the plan are composed (Opacus RDP, cached curves; no PRV here)
        at the smaller of ``delta`` and every delta the past entries recorded.

        Parameters
        ----------
        fingerprint : str
            Dataset fingerprint.
        planned : sequence of Mechanism
            Everything the request would still release (e.g. all remaining rounds of a plan).
        delta : float
            Delta of the request, in (0, 1).

        Returns
        -------
        float
            Epsilon after the plan.

        Raises
        ------
        BudgetExceededError
            If that epsilon exceeds the cap (+ :data:`CAP_TOLERANCE`); its ``safe_reason``
            says what was spent, the cap and what the plan would bring it to.
        common.ledger.LedgerError
            If the ledger cannot be read.
        """
        return self._after(self.ledger.entries(fingerprint, level="patient"), planned, delta)

    def _after(
        self, past: Sequence[LedgerEntry], planned: Sequence[Mechanism], delta: float
    ) -> float:
        """Epsilon of ``past`` entries plus ``planned`` at the smallest delta; raise over the cap."""
        use_delta = min([delta, *(e.delta for e in past)])
        history = [e.mechanism for e in past]
        after = epsilon_of([*history, *planned], delta=use_delta)
        if after > self.cap + CAP_TOLERANCE:
            before = epsilon_of(history, delta=use_delta)
            raise BudgetExceededError(
                f"dataset {past[0].fingerprint[:12] if past else '(new)'}: spent "
                f"epsilon={before:.4f} of cap {self.cap:g}; "
                f"plan would bring it to {after:.4f} (delta={use_delta:g})",
                safe_reason=(
                    f"refused: this dataset has spent epsilon={epsilon_text(before, 2)} of "
                    f"its cap {self.cap:g}; the plan would bring it to "
                    f"{epsilon_text(after, 2)}"
                ),
            )
        return after

    def charge(self, entry: LedgerEntry) -> float:
        """Check one release against the cap, then append it; return the epsilon after it.

        Hospital-level entries are appended without a patient-level check; the returned
        value is then the dataset's hospital-level epsilon.

        Raises
        ------
        BudgetExceededError
            If a patient-level release would exceed the cap (nothing is appended).
        common.ledger.LedgerError
            If the ledger cannot be written (torn tail, broken chain).
        """
        if entry.level == "patient":
            after: list[float] = []

            def within_cap(records: Sequence[LedgerRecord]) -> None:
                # Runs under the ledger's file lock: check and append are one step.
                past = [r.entry for r in records
                        if r.entry.fingerprint == entry.fingerprint and r.entry.level == "patient"]
                after.append(self._after(past, [entry.mechanism], entry.delta))

            self.ledger.append(entry, precondition=within_cap)
            return after[0]
        self.ledger.append(entry)
        entries = self.ledger.entries(entry.fingerprint, level=entry.level)
        return epsilon_of([e.mechanism for e in entries], delta=min(e.delta for e in entries))
