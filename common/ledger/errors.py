"""The ledger's error type."""

from __future__ import annotations

from common.errors import VesaliusError

__all__ = ["LedgerError"]


class LedgerError(VesaliusError):
    """The privacy ledger cannot be read or written safely (torn tail, broken chain, no key).

    A node that cannot read its ledger cannot know what a dataset has spent, so it refuses
    every release until an auditor has looked at the file (``vesalius audit verify``).
    """

    safe_reason = "refused: the node's privacy ledger needs an auditor's attention"
