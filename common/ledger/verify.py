"""The auditor's check of a ledger file: parse, chain, signatures, torn tail and epsilon.

:func:`verify_ledger` never trusts the node's own accounting: it recomputes every dataset's
epsilon from the raw mechanisms with Google's ``dp_accounting``
(:func:`~common.ledger.accounting.epsilon_independent`) and compares it with Opacus's
(:func:`~common.ledger.accounting.epsilon_of`) and with the epsilon each entry says the
trainer reported.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.ledger.accounting import (
    DEFAULT_TOLERANCE,
    epsilon_independent,
    epsilon_of,
    epsilons_agree,
)
from common.ledger.entry import GENESIS, LedgerRecord
from common.ledger.errors import LedgerError
from common.ledger.keys import key_id, load_public_key, public_key_path, verify_signature
from common.ledger.mechanism import Mechanism
from common.ledger.store import chain_problem, parse_file

__all__ = ["DatasetSummary", "Problem", "VerifyReport", "verify_ledger"]


@dataclass(frozen=True)
class Problem:
    """One defect, naming the entry (0-based index) and the file line (1-based)."""

    index: int
    line: int
    reason: str

    def describe(self) -> str:
        """``entry 3 (line 4): reason``."""
        return f"entry {self.index} (line {self.line}): {self.reason}"


@dataclass(frozen=True)
class DatasetSummary:
    """Per dataset and level: the spend recomputed by both libraries.

    ``delta`` is the smallest delta of the dataset's entries (composition is done there).
    """

    fingerprint: str
    level: str
    entries: int
    runs: tuple[str, ...]
    delta: float
    epsilon_rdp: float
    epsilon_independent: float

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (infinite epsilons as the string ``"inf"``)."""
        return {
            "fingerprint": self.fingerprint,
            "level": self.level,
            "entries": self.entries,
            "runs": list(self.runs),
            "delta": self.delta,
            "epsilon_rdp": _json_float(self.epsilon_rdp),
            "epsilon_independent": _json_float(self.epsilon_independent),
        }


@dataclass
class VerifyReport:
    """Outcome of :func:`verify_ledger`: ``ok`` is true only when ``problems`` is empty."""

    path: Path
    records: int
    tolerance: float
    key_id: str | None
    problems: list[Problem] = field(default_factory=list)
    datasets: list[DatasetSummary] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {
            "ledger": str(self.path),
            "ok": self.ok,
            "records": self.records,
            "tolerance": self.tolerance,
            "key_id": self.key_id,
            "problems": [
                {"index": p.index, "line": p.line, "reason": p.reason} for p in self.problems
            ],
            "datasets": [d.to_dict() for d in self.datasets],
        }


def _json_float(value: float) -> float | str:
    return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else value)


def verify_ledger(
    path: Path,
    *,
    public_key: Path | bytes | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    expect_heads: Sequence[str] = (),
) -> VerifyReport:
    """Check a ledger file end to end.

    Checks, for every line: it parses as a record; it is the canonical serialisation of that
    record (so any edited byte shows); its index is its position; its ``prev`` is the hash of
    the record before; its hash matches its content; its key id and Ed25519 signature match
    ``public_key``. A torn last line is a problem naming its entry and line (earlier entries
    are still checked and counted). Then, per dataset and level, in ledger order: the
    cumulative epsilon at each entry that carries ``epsilon_reported`` (composed at that
    entry's delta) must agree with it, and the total composed with Opacus
    (:func:`~common.ledger.accounting.epsilon_of`) must agree with dp_accounting's
    (:func:`~common.ledger.accounting.epsilon_independent`); on disagreement the first entry
    at which the cumulative values diverge is named.

    Parameters
    ----------
    path : Path
        The ledger file.
    public_key : Path or bytes, optional
        The node's public key (PEM file or bytes). Default: ``node-key.pub`` beside the ledger,
        which only shows the file is self-consistent: whoever can rewrite the folder can
        replace both. Auditors should pass the key the node registered with them.
    tolerance : float, optional
        Relative tolerance of epsilon comparisons (default 0.01, i.e. 1 %; see
        :data:`~common.ledger.accounting.DEFAULT_TOLERANCE`).
    expect_heads : sequence of str, optional
        Anchors ``"INDEX:HASH"`` recorded outside the node (a run report's ``sites[*]
        .ledger_head``, the head each node reported after its last release in the run; an
        exported summary's head). The chain
        alone cannot show that its *last* entries were removed, or that the file was replaced
        by a fresh one; an anchor can: entry INDEX must exist and carry HASH.

    Returns
    -------
    VerifyReport

    Raises
    ------
    LedgerError
        If the ledger file does not exist or cannot be read, or the public key cannot be
        loaded.
    """
    path = Path(path)
    if not path.is_file():
        raise LedgerError(f"no ledger file at {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise LedgerError(f"cannot read the ledger {path}: {exc}") from exc
    key_source: Path | bytes | None = public_key
    if key_source is None:
        default = public_key_path(path.parent / "node-key.pem")
        key_source = default if default.is_file() else None
    key = load_public_key(key_source) if key_source is not None else None
    kid = key_id(key) if key is not None else None

    parsed, torn = parse_file(data)
    report = VerifyReport(path=path, records=len(parsed), tolerance=tolerance, key_id=kid)
    if key is None and parsed:
        report.problems.append(Problem(0, 1, (
            "no public key to check the signatures against (give --public-key or keep "
            "node-key.pub beside the ledger)"
        )))
    good: list[tuple[int, int, LedgerRecord]] = []
    prev: str | tuple[str, ...] | None = GENESIS
    for index, line in enumerate(parsed):
        problem = chain_problem(line, index, prev)
        record = line.record
        if problem is None and record is not None and key is not None:
            if record.kid != kid:
                problem = f"signed by key {record.kid}, not by the given public key {kid}"
            elif not verify_signature(key, record.signed_bytes(), record.sig):
                problem = "its Ed25519 signature is not valid for its content"
        if problem is not None:
            report.problems.append(Problem(index, line.number, problem))
        elif record is not None:
            good.append((index, line.number, record))
        # The next record may link to this one's stored or recomputed hash (so that one edited
        # entry is reported once); after an unreadable line its link cannot be checked.
        prev = (record.hash, record.expected_hash()) if record is not None else None
    if torn is not None:
        report.problems.append(Problem(torn.index, torn.line, torn.describe()))
    for anchor in expect_heads:
        missing = _anchor_problem(anchor, parsed)
        if missing is not None:
            report.problems.append(missing)
    _check_epsilons(good, tolerance, report)
    return report


def _anchor_problem(anchor: str, parsed: Sequence[Any]) -> Problem | None:
    """A problem when the anchored entry ``INDEX:HASH`` is missing or differs."""
    index_text, _, digest = anchor.partition(":")
    if not index_text.isdigit() or not digest:
        raise LedgerError(f"an expected head must read INDEX:HASH, got {anchor!r}")
    index = int(index_text)
    if index >= len(parsed):
        return Problem(index, index + 1, (
            f"the ledger ends at entry {len(parsed) - 1}, but an anchor outside the node "
            f"records entry {index} ({digest[:16]}...): entries were removed or the file "
            "was replaced"
        ))
    record = parsed[index].record
    if record is None or record.hash != digest:
        return Problem(index, index + 1, (
            f"entry {index} does not carry the anchored hash {digest[:16]}...: the ledger "
            "was rewritten from this entry on"
        ))
    return None


def _check_epsilons(
    good: Sequence[tuple[int, int, LedgerRecord]], tolerance: float, report: VerifyReport
) -> None:
    groups: dict[tuple[str, str], list[tuple[int, int, LedgerRecord]]] = defaultdict(list)
    for item in good:
        entry = item[2].entry
        groups[(entry.fingerprint, entry.level)].append(item)
    for (fingerprint, level), items in groups.items():
        mechs: list[Mechanism] = []
        for index, number, record in items:
            mechs.append(record.entry.mechanism)
            reported = record.entry.epsilon_reported
            if reported is None:
                continue
            cumulative = epsilon_of(mechs, delta=record.entry.delta)
            if not epsilons_agree(reported, cumulative, tolerance=tolerance):
                report.problems.append(Problem(index, number, (
                    f"reported epsilon {reported:.6g} but the ledger's {level}-level history of "
                    f"this dataset up to here composes to {cumulative:.6g} at delta "
                    f"{record.entry.delta:g} (tolerance {tolerance:g})"
                )))
        delta = min(r.entry.delta for _, _, r in items)
        eps = epsilon_of(mechs, delta=delta)
        indep = epsilon_independent(mechs, delta=delta)
        if not epsilons_agree(eps, indep, tolerance=tolerance):
            index, number = _first_divergence(items, delta, tolerance)
            report.problems.append(Problem(index, number, (
                f"Opacus composes this dataset to epsilon {eps:.6g} but dp_accounting to "
                f"{indep:.6g} at delta {delta:g}; they first disagree at this entry"
            )))
        report.datasets.append(DatasetSummary(
            fingerprint=fingerprint,
            level=level,
            entries=len(items),
            runs=tuple(dict.fromkeys(r.entry.run_id for _, _, r in items)),
            delta=delta,
            epsilon_rdp=eps,
            epsilon_independent=indep,
        ))


def _first_divergence(
    items: Sequence[tuple[int, int, LedgerRecord]], delta: float, tolerance: float
) -> tuple[int, int]:
    """Index and line of the first entry whose cumulative epsilons disagree (linear scan)."""
    mechs: list[Mechanism] = []
    for index, number, record in items:
        mechs.append(record.entry.mechanism)
        if not epsilons_agree(
            epsilon_of(mechs, delta=delta), epsilon_independent(mechs, delta=delta),
            tolerance=tolerance,
        ):
            return index, number
    return items[-1][0], items[-1][1]
