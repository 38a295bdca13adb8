"""Ledger entries (what a node records per release) and records (an entry once chained).

On disk the ledger is JSON lines. Each line is one :class:`LedgerRecord` in canonical JSON
(sorted keys, no spaces, ASCII only, no NaN) followed by ``\\n``::

    {"entry": {...}, "hash": "<sha256 hex>", "index": 0, "kid": "<key id>",
     "prev": "<hash of the previous record, or 64 zeros>", "sig": "<base64 Ed25519>", "v": 1}

``hash`` is SHA-256 over the canonical JSON of the record *without* ``hash`` and ``sig`` (so it
covers the previous record's hash: a hash chain); ``sig`` is the node's Ed25519 signature of
those same bytes. Because the canonical form is unique, an auditor can also check that every
line is byte-for-byte the canonical serialisation of what it parses to, so that *any* edited
byte is detected, even one that would parse to the same values.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError
from common.ledger.mechanism import Mechanism

__all__ = [
    "FORMAT_VERSION",
    "GENESIS",
    "LEVELS",
    "LedgerEntry",
    "LedgerRecord",
    "canonical_json",
]

FORMAT_VERSION = 1
GENESIS = "0" * 64
"""``prev`` of the first record."""

LEVELS = ("patient", "hospital", "exact")
"""Privacy levels. Only ``"patient"`` entries count against a node's epsilon cap;
``"hospital"`` entries (client-level DP of the federation) are reported separately and never
mixed with them; ``"exact"`` entries record releases that carry no DP guarantee (exact
evaluation metrics and statistics under the node's small-count rules, see
:mod:`client.release`) so that every release is on the record. Their mechanism is a Gaussian
with no noise (epsilon infinite); they are listed, never composed into a cap."""

_ENTRY_FIELDS = (
    "fingerprint", "run_id", "release", "mechanism", "delta", "dataset_size", "fold", "round",
    "level", "epsilon_reported", "params", "time",
)
_RECORD_FIELDS = ("v", "index", "prev", "kid", "entry", "hash", "sig")


def canonical_json(value: Any) -> bytes:
    """Serialise ``value`` to its canonical JSON bytes (sorted keys, compact, ASCII, no NaN)."""
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode("ascii")


def _optional_int(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ConfigError(f"ledger entry {name} must be an integer >= 0 or null, got {value!r}")
    return int(value)


def _check_params(params: Any) -> dict[str, Any]:
    if not isinstance(params, Mapping):
        raise ConfigError(f"ledger entry params must be a mapping, got {type(params).__name__}")
    out: dict[str, Any] = {}
    for key, value in params.items():
        if not isinstance(key, str):
            raise ConfigError(f"ledger entry params keys must be strings, got {key!r}")
        if value is not None and not isinstance(value, (bool, int, float, str)):
            raise ConfigError(
                f"ledger entry param {key!r} must be a JSON scalar, got {type(value).__name__}"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"ledger entry param {key!r} must be finite, got {value!r}")
        out[key] = value
    return out


@dataclass(frozen=True)
class LedgerEntry:
    """One release of information derived from a dataset, as a node appends it.

    Parameters
    ----------
    fingerprint : str
        Dataset fingerprint (hash of the ingestion index): the unit a budget is kept for.
    run_id : str
        Federation run that asked for the release.
    release : str
        What was released: ``"train"``, ``"evaluate"``, ``"query:<name>"``, ...
    mechanism : Mechanism
        The mechanism and its parameters.
    delta : float
        Delta of the guarantee at which the node accounts this dataset, in (0, 1).
    dataset_size : int
        Patients in the dataset (for reporting).
    fold, round : int or None, optional
        Cross-validation fold and federated round, when they apply.
    level : {"patient", "hospital", "exact"}, optional
        Unit of privacy. Only ``"patient"`` entries count against the node's epsilon cap;
        ``"hospital"`` entries (client-level DP) are composed and reported separately;
        ``"exact"`` entries record releases without DP (see :data:`LEVELS`).
    epsilon_reported : float or None, optional
        Total epsilon the trainer reported after this release (``inf`` for a release with no
        guarantee); cross-checked by :func:`common.ledger.verify_ledger`.
    params : dict, optional
        Extra parameters to record (``max_grad_norm``, ``local_epochs``, ``batch_size``,
        ``model``...); JSON scalars only.
    time : str, optional
        ISO-8601 UTC time; :meth:`common.ledger.Ledger.append` fills it when empty.

    Raises
    ------
    ConfigError
        If a value is invalid.
    """

    fingerprint: str
    run_id: str
    release: str
    mechanism: Mechanism
    delta: float
    dataset_size: int
    fold: int | None = None
    round: int | None = None
    level: str = "patient"
    epsilon_reported: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    time: str = ""

    def __post_init__(self) -> None:
        for name in ("fingerprint", "run_id", "release"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ConfigError(f"ledger entry {name} must be a non-empty string, got {value!r}")
        if not isinstance(self.mechanism, Mechanism):
            raise ConfigError("ledger entry mechanism must be a Mechanism")
        if isinstance(self.delta, bool) or not isinstance(self.delta, (int, float)) or not (
            0.0 < float(self.delta) < 1.0
        ):
            raise ConfigError(f"ledger entry delta must lie in (0, 1), got {self.delta!r}")
        object.__setattr__(self, "delta", float(self.delta))
        if (
            isinstance(self.dataset_size, bool)
            or not isinstance(self.dataset_size, numbers.Integral)
            or self.dataset_size < 0
        ):
            raise ConfigError(f"dataset_size must be an integer >= 0, got {self.dataset_size!r}")
        object.__setattr__(self, "dataset_size", int(self.dataset_size))
        object.__setattr__(self, "fold", _optional_int("fold", self.fold))
        object.__setattr__(self, "round", _optional_int("round", self.round))
        if self.level not in LEVELS:
            raise ConfigError(f"ledger entry level must be one of {LEVELS}, got {self.level!r}")
        rep = self.epsilon_reported
        if rep is not None:
            if isinstance(rep, bool) or not isinstance(rep, (int, float)) or math.isnan(rep) or (
                rep < 0
            ):
                raise ConfigError(f"epsilon_reported must be a number >= 0 or None, got {rep!r}")
            object.__setattr__(self, "epsilon_reported", float(rep))
        object.__setattr__(self, "params", _check_params(self.params))
        if not isinstance(self.time, str):
            raise ConfigError(f"ledger entry time must be an ISO-8601 string, got {self.time!r}")

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (an infinite ``epsilon_reported`` becomes ``"inf"``)."""
        rep: float | str | None = self.epsilon_reported
        if self.epsilon_reported is not None and math.isinf(self.epsilon_reported):
            rep = "inf"
        return {
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "release": self.release,
            "mechanism": self.mechanism.to_dict(),
            "delta": self.delta,
            "dataset_size": self.dataset_size,
            "fold": self.fold,
            "round": self.round,
            "level": self.level,
            "epsilon_reported": rep,
            "params": dict(self.params),
            "time": self.time,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LedgerEntry:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ConfigError
            If keys are missing or unknown, or a value is invalid.
        """
        if not isinstance(data, Mapping):
            raise ConfigError("a ledger entry must be a JSON object")
        keys = set(data)
        if keys != set(_ENTRY_FIELDS):
            raise ConfigError(
                f"ledger entry keys differ from the format: missing "
                f"{sorted(set(_ENTRY_FIELDS) - keys)}, unknown {sorted(keys - set(_ENTRY_FIELDS))}"
            )
        values = dict(data)
        values["mechanism"] = Mechanism.from_dict(data["mechanism"])
        if values["epsilon_reported"] == "inf":
            values["epsilon_reported"] = math.inf
        return cls(**values)


@dataclass(frozen=True)
class LedgerRecord:
    """An entry as stored: its position, the chain link, the hash and the signature.

    Attributes
    ----------
    index : int
        Position in the ledger (0-based; line ``index + 1`` of the file).
    prev : str
        Hash of the previous record (:data:`GENESIS` for the first).
    kid : str
        Key id of the signing key (SHA-256 hex of its raw public bytes, first 16 characters).
    entry : LedgerEntry
        The entry.
    hash : str
        SHA-256 hex over :meth:`signed_bytes`.
    sig : str
        Base64 Ed25519 signature over :meth:`signed_bytes`.
    """

    index: int
    prev: str
    kid: str
    entry: LedgerEntry
    hash: str
    sig: str

    def body(self) -> dict[str, Any]:
        """The signed part of the record (everything but ``hash`` and ``sig``)."""
        return body_of(self.index, self.prev, self.kid, self.entry)

    def signed_bytes(self) -> bytes:
        """Canonical bytes that ``hash`` digests and ``sig`` signs."""
        return canonical_json(self.body())

    def expected_hash(self) -> str:
        """SHA-256 hex of :meth:`signed_bytes` (equals ``hash`` when untouched)."""
        return hashlib.sha256(self.signed_bytes()).hexdigest()

    def to_line(self) -> bytes:
        """The record's canonical line, newline included."""
        doc = self.body()
        doc["hash"] = self.hash
        doc["sig"] = self.sig
        return canonical_json(doc) + b"\n"

    @classmethod
    def from_json(cls, doc: Any) -> LedgerRecord:
        """Build a record from a parsed line.

        Raises
        ------
        ConfigError
            If the line is not a record of this format.
        """
        if not isinstance(doc, dict) or set(doc) != set(_RECORD_FIELDS):
            raise ConfigError(f"not a ledger record: expected the keys {sorted(_RECORD_FIELDS)}")
        if doc["v"] != FORMAT_VERSION:
            raise ConfigError(f"unknown ledger format version {doc['v']!r}")
        index = doc["index"]
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ConfigError(f"record index must be an integer >= 0, got {index!r}")
        for name in ("prev", "kid", "hash", "sig"):
            if not isinstance(doc[name], str):
                raise ConfigError(f"record {name} must be a string")
        return cls(
            index=index,
            prev=doc["prev"],
            kid=doc["kid"],
            entry=LedgerEntry.from_dict(doc["entry"]),
            hash=doc["hash"],
            sig=doc["sig"],
        )


def body_of(index: int, prev: str, kid: str, entry: LedgerEntry) -> dict[str, Any]:
    """The signed dict of a record."""
    return {"v": FORMAT_VERSION, "index": index, "prev": prev, "kid": kid, "entry": entry.to_dict()}
