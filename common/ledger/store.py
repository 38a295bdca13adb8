"""The node's append-only privacy ledger: a hash-chained, signed JSON-lines file.

Writes are crash-safe in the sense the audit needs: each record is one ``write`` of one
complete line, followed by ``flush`` and ``os.fsync`` (and an ``fsync`` of the folder when the
file is created), under an exclusive ``fcntl.flock`` so that two processes of one node cannot
interleave. A writer killed mid-record (``kill -9``, power loss) can leave at most a *torn
tail*: a last line without its newline, or one that does not parse. :meth:`Ledger.read`
reports it and never drops or repairs it; :meth:`Ledger.append` refuses to write after it
(or after any break of the chain) until an auditor has looked at the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from common.errors import ConfigError
from common.ledger.accounting import epsilon_of
from common.ledger.entry import GENESIS, LEVELS, LedgerEntry, LedgerRecord, body_of, canonical_json
from common.ledger.errors import LedgerError
from common.ledger.keys import (
    key_id,
    load_or_create_private_key,
    public_key_path,
    public_pem,
    sign,
    verify_signature,
)
from common.ledger.mechanism import Mechanism
from common.privacy.accountant import AccountantState, PrivacyEvent

__all__ = ["Ledger", "LedgerRead", "ParsedLine", "Spend", "TornTail", "split_lines"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TornTail:
    """An incomplete last record (an interrupted write).

    Attributes
    ----------
    index : int
        Index the record would have had (= number of intact records before it).
    line : int
        1-based line number in the file.
    offset : int
        Byte offset where the torn line starts.
    size : int
        Bytes in the torn line.
    reason : str
        Why it is considered torn.
    """

    index: int
    line: int
    offset: int
    size: int
    reason: str

    def describe(self) -> str:
        """One sentence for users and auditors."""
        return (
            f"entry {self.index} (line {self.line}, byte {self.offset}, {self.size} bytes) is "
            f"torn: {self.reason}; it is not counted and was not repaired"
        )


@dataclass(frozen=True)
class LedgerRead:
    """What :meth:`Ledger.read` found: intact records and a torn tail, if any."""

    records: tuple[LedgerRecord, ...]
    torn: TornTail | None


@dataclass(frozen=True)
class Spend:
    """What a dataset has spent, at one privacy level.

    Attributes
    ----------
    fingerprint : str
        Dataset fingerprint.
    epsilon_rdp : float
        Composed epsilon, Opacus RDP (the accounting of record).
    epsilon_prv : float
        Composed epsilon, Opacus PRV (``nan`` if it could not be evaluated).
    delta : float
        Delta of both epsilons: the smallest delta among the entries (0.0 when none).
    entries : int
        Number of entries.
    runs : tuple of str
        Run ids, in order of first appearance.
    level : str
        ``"patient"`` or ``"hospital"``.
    per_run : tuple of (str, float)
        RDP epsilon of each run's entries alone, at ``delta`` (the per-run breakdown).
    """

    fingerprint: str
    epsilon_rdp: float
    epsilon_prv: float
    delta: float
    entries: int
    runs: tuple[str, ...]
    level: str = "patient"
    per_run: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class ParsedLine:
    """One complete line of the file: its bytes, and the record or the parse error."""

    number: int
    offset: int
    raw: bytes
    record: LedgerRecord | None
    error: str | None


def split_lines(data: bytes) -> tuple[list[tuple[int, bytes]], tuple[int, bytes] | None]:
    """Split file bytes into complete lines ``(offset, bytes without newline)`` and a tail.

    The tail is the bytes after the last newline (``None`` when the file ends with one).
    """
    lines: list[tuple[int, bytes]] = []
    start = 0
    while True:
        end = data.find(b"\n", start)
        if end < 0:
            break
        lines.append((start, data[start:end]))
        start = end + 1
    tail = (start, data[start:]) if start < len(data) else None
    return lines, tail


def parse_line(number: int, offset: int, raw: bytes) -> ParsedLine:
    """Parse one line into a record, or say why it is not one."""
    try:
        record = LedgerRecord.from_json(json.loads(raw.decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return ParsedLine(number, offset, raw, None, f"not valid JSON ({exc})")
    except (ConfigError, TypeError, ValueError) as exc:
        return ParsedLine(number, offset, raw, None, f"not a valid record ({exc})")
    return ParsedLine(number, offset, raw, record, None)


def parse_file(data: bytes) -> tuple[list[ParsedLine], TornTail | None]:
    """Parse all complete lines; classify a missing final newline or a bad last line as torn."""
    lines, tail = split_lines(data)
    parsed = [parse_line(i + 1, off, raw) for i, (off, raw) in enumerate(lines)]
    torn: TornTail | None = None
    if tail is not None:
        offset, raw = tail
        torn = TornTail(len(parsed), len(parsed) + 1, offset, len(raw),
                        "the last line has no newline (an interrupted write)")
    elif parsed and parsed[-1].record is None:
        last = parsed.pop()
        torn = TornTail(len(parsed), last.number, last.offset, len(last.raw) + 1,
                        f"the last line is unreadable: {last.error}")
    return parsed, torn


def chain_problem(
    parsed: ParsedLine, index: int, prev: str | tuple[str, ...] | None
) -> str | None:
    """The first chain defect of one record (parse, index, prev link, hash, canonical bytes).

    ``prev`` is the hash the record must link to; an auditor may pass several acceptable
    values (the previous record's stored and recomputed hash, so that one edit is reported
    once) or ``None`` to skip the link check after an unreadable line.
    """
    record = parsed.record
    if record is None:
        return parsed.error
    if record.index != index:
        return f"record says index {record.index} but stands at position {index}"
    allowed = (prev,) if isinstance(prev, str) else prev
    if allowed is not None and record.prev not in allowed:
        return "its link to the previous entry (prev hash) does not match: chain broken"
    if record.hash != record.expected_hash():
        return "its content does not match its hash: the entry was modified"
    if record.to_line() != parsed.raw + b"\n":
        return "its bytes are not the canonical serialisation of the entry: the line was edited"
    return None


class Ledger:
    """A node's privacy ledger.

    Parameters
    ----------
    path : Path
        The JSON-lines file (``NodeConfig.ledger_path``); created at the first append, with
        its folder (mode 0700).
    key_path : Path, optional
        The node's Ed25519 private key, default ``path.parent / "node-key.pem"``; made at
        first use (mode 0600), never overwritten. Its public key is ``node-key.pub`` beside it.
    """

    def __init__(self, path: Path, *, key_path: Path | None = None) -> None:
        self.path = Path(path)
        default_key = self.path.parent / "node-key.pem"
        self.key_path = Path(key_path) if key_path is not None else default_key

    # ------------------------------------------------------------------ keys
    @property
    def public_key_pem(self) -> bytes:
        """PEM of the node's public key (makes the key pair at first use)."""
        return public_pem(load_or_create_private_key(self.key_path))

    @property
    def public_key_path(self) -> Path:
        """Where the public key is written for auditors (``node-key.pub``)."""
        return public_key_path(self.key_path)

    def sign_bytes(self, data: bytes) -> str:
        """Base64 Ed25519 signature of ``data`` with the node key (made at first use)."""
        return sign(load_or_create_private_key(self.key_path), data)

    # ------------------------------------------------------------------ reading
    def read(self) -> LedgerRead:
        """Return the intact records and the torn tail, if any.

        A missing file is an empty ledger. Records are not checked against their hashes or
        signatures here (that is :func:`common.ledger.verify_ledger`'s job).

        Raises
        ------
        LedgerError
            If a line other than the last one cannot be parsed (the file was damaged or
            edited; run ``vesalius audit verify``).
        """
        try:
            with open(self.path, "rb") as fh:
                fcntl.flock(fh.fileno(), fcntl.LOCK_SH)  # never see an append in flight
                try:
                    data = fh.read()
                finally:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        except FileNotFoundError:
            return LedgerRead((), None)
        except OSError as exc:
            raise LedgerError(f"cannot read the ledger {self.path}: {exc}") from exc
        return self._records_of(data)

    def _records_of(self, data: bytes) -> LedgerRead:
        parsed, torn = parse_file(data)
        for line in parsed:
            if line.record is None:
                raise LedgerError(
                    f"ledger {self.path} is damaged at line {line.number}: {line.error}; "
                    f"run `vesalius audit verify --ledger {self.path}`"
                )
        return LedgerRead(tuple(p.record for p in parsed if p.record is not None), torn)

    def entries(self, fingerprint: str, *, level: str = "patient") -> list[LedgerEntry]:
        """Entries of one dataset at one privacy level, in ledger order."""
        if level not in LEVELS:
            raise ConfigError(f"level must be one of {LEVELS}, got {level!r}")
        return [
            r.entry for r in self.read().records
            if r.entry.fingerprint == fingerprint and r.entry.level == level
        ]

    def history(self, fingerprint: str) -> AccountantState:
        """Patient-level Gaussian events of a dataset as an Opacus accountant history.

        Pass it as ``prior`` to :func:`client.training.train_dp` so that the trainer's
        reported epsilon composes the dataset's whole past. Laplace entries cannot be
        expressed in this form: they are left out with a warning (the ledger still counts them).
        """
        events: list[PrivacyEvent] = []
        for entry in self.entries(fingerprint):
            mech = entry.mechanism
            if not mech.is_gaussian:
                log.warning("history(): a laplace entry of this dataset is not in the trainer's "
                            "prior; the trainer's epsilon will be below the ledger's")
                continue
            if mech.steps > 0:
                events.append(PrivacyEvent(mech.noise_multiplier, mech.sample_rate, mech.steps))
        return AccountantState(tuple(events))

    def spend(self, fingerprint: str, *, level: str = "patient", prv: bool = True) -> Spend:
        """Compose every entry of a dataset at one level (RDP and PRV) at its smallest delta.

        ``prv=False`` skips Opacus's PRV accountant (about a second on 2 cores) and leaves
        ``epsilon_prv`` NaN.
        """
        entries = self.entries(fingerprint, level=level)
        return spend_of(fingerprint, entries, level=level, prv=prv)

    # ------------------------------------------------------------------ writing
    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[IO[bytes], bool]]:
        folder = self.path.parent
        if not folder.exists():
            folder.mkdir(parents=True, exist_ok=True)
            os.chmod(folder, 0o700)
        created = not self.path.exists()
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        except OSError as exc:
            raise LedgerError(f"cannot open the ledger {self.path} for writing: {exc}") from exc
        with os.fdopen(fd, "a+b") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                if created:
                    dir_fd = os.open(folder, os.O_RDONLY)
                    try:
                        os.fsync(dir_fd)
                    finally:
                        os.close(dir_fd)
                yield fh, created
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def append(
        self,
        entry: LedgerEntry,
        *,
        precondition: Callable[[Sequence[LedgerRecord]], None] | None = None,
    ) -> LedgerRecord:
        """Chain, sign and durably append one entry; return the stored record.

        Parameters
        ----------
        entry : LedgerEntry
            The release to record; an empty ``time`` is set to now (UTC).
        precondition : callable, optional
            Called with the intact records while the file lock is held, just before writing;
            raising aborts the append. :class:`client.privacy_guard.NodeBudget` checks the
            cap here, so two processes cannot both pass the check and overspend.

        Raises
        ------
        LedgerError
            If the file has a torn tail or a broken chain (nothing is written: an auditor
            must look first), or cannot be written.
        """
        if not isinstance(entry, LedgerEntry):
            raise ConfigError("append() takes a LedgerEntry")
        if not entry.time:
            stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
            entry = replace(entry, time=stamp)
        key = load_or_create_private_key(self.key_path)
        kid = key_id(key.public_key())
        with self._locked() as (fh, _):
            fh.seek(0)
            data = fh.read()
            prev, records = self._check_writable(data, key.public_key())
            if precondition is not None:
                precondition(records)
            index = len(records)
            body = body_of(index, prev, kid, entry)
            signed = canonical_json(body)
            record = LedgerRecord(
                index=index, prev=prev, kid=kid, entry=entry,
                hash=hashlib.sha256(signed).hexdigest(), sig=sign(key, signed),
            )
            line = record.to_line()
            try:
                # One write(2) of one complete line (O_APPEND), then fsync: a crash leaves the
                # earlier lines intact and at most a torn last line.
                written = os.write(fh.fileno(), line)
                os.fsync(fh.fileno())
            except OSError as exc:
                raise LedgerError(f"could not write the ledger {self.path}: {exc}") from exc
            if written != len(line):
                raise LedgerError(
                    f"short write to the ledger {self.path} ({written} of {len(line)} bytes; "
                    "disk full?): the last entry is torn; run `vesalius audit verify`"
                )
        log.info("ledger: entry %d (%s, run %s) appended", index, entry.release, entry.run_id)
        return record

    def _check_writable(
        self, data: bytes, public_key: Ed25519PublicKey
    ) -> tuple[str, list[LedgerRecord]]:
        """Return the hash to chain to and the records, or raise if an audit must come first.

        Checks the whole chain (hashes, links, canonical bytes), that every record names this
        node's key, and the signature of the last record (checking every signature on every
        append would cost ~0.1 ms per entry; the auditor checks them all).
        """
        kid = key_id(public_key)
        parsed, torn = parse_file(data)
        hint = (
            f"run `vesalius audit verify --ledger {self.path}`; an auditor must inspect and "
            "archive this file before the node records (and so releases) anything more"
        )
        if torn is not None:
            raise LedgerError(
                f"refusing to append to {self.path}: {torn.describe()}; {hint}",
                safe_reason="refused: the node's privacy ledger has a torn entry and needs an "
                "auditor's attention",
            )
        prev = GENESIS
        for index, line in enumerate(parsed):
            problem = chain_problem(line, index, prev)
            if problem is None and line.record is not None and line.record.kid != kid:
                problem = f"it was signed by key {line.record.kid}, not this node's key {kid}"
            if problem is None and index == len(parsed) - 1 and line.record is not None:
                if not verify_signature(public_key, line.record.signed_bytes(), line.record.sig):
                    problem = "its signature is not valid for its content"
            if problem is not None:
                raise LedgerError(
                    f"refusing to append to {self.path}: entry {index} (line {line.number}): "
                    f"{problem}; {hint}",
                    safe_reason="refused: the node's privacy ledger failed its integrity check",
                )
            assert line.record is not None
            prev = line.record.hash
        return prev, [p.record for p in parsed if p.record is not None]


def spend_of(
    fingerprint: str, entries: list[LedgerEntry], *, level: str, prv: bool = True
) -> Spend:
    """Compose ``entries`` (one dataset, one level) into a :class:`Spend`."""
    if not entries:
        return Spend(fingerprint, 0.0, 0.0, 0.0, 0, (), level, ())
    delta = min(e.delta for e in entries)
    mechs: list[Mechanism] = [e.mechanism for e in entries]
    runs = tuple(dict.fromkeys(e.run_id for e in entries))
    per_run = tuple(
        (run, epsilon_of([e.mechanism for e in entries if e.run_id == run], delta=delta))
        for run in runs
    )
    return Spend(
        fingerprint=fingerprint,
        epsilon_rdp=epsilon_of(mechs, delta=delta),
        epsilon_prv=epsilon_of(mechs, delta=delta, accountant="prv") if prv else math.nan,
        delta=delta,
        entries=len(entries),
        runs=runs,
        level=level,
        per_run=per_run,
    )
