"""A signed JSON summary of a ledger for a review board (``vesalius audit export``).

The summary lists every dataset (fingerprint, level, delta, epsilon by Opacus RDP, Opacus PRV
and dp_accounting, cap and remaining budget when known), and per run the releases, folds,
rounds, mechanisms and recorded parameters; it embeds the ledger file's SHA-256, its head
hash, the outcome of :func:`~common.ledger.verify_ledger` and the code version. It is signed
with the node's Ed25519 key over its canonical JSON (everything except ``signature``);
:func:`verify_summary` checks it against the node's public key.
"""

from __future__ import annotations

import copy
import hashlib
import math
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from common.ledger.accounting import DEFAULT_TOLERANCE, epsilon_of
from common.ledger.entry import LedgerEntry, canonical_json
from common.ledger.errors import LedgerError
from common.ledger.keys import (
    key_id,
    load_private_key,
    load_public_key,
    public_pem,
    sign,
    verify_signature,
)
from common.ledger.store import Ledger, spend_of
from common.ledger.verify import verify_ledger

__all__ = ["SUMMARY_FORMAT", "export_summary", "verify_summary"]

SUMMARY_FORMAT = "vesalius-privacy-summary/1"


def _num(value: float) -> float | str:
    return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else value)


def _unique(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: dict[bytes, dict[str, Any]] = {}
    for item in items:
        seen.setdefault(canonical_json(item), item)
    return list(seen.values())


def _run_summary(run: str, entries: list[LedgerEntry], delta: float) -> dict[str, Any]:
    return {
        "run_id": run,
        "entries": len(entries),
        "releases": dict(Counter(e.release for e in entries)),
        "folds": sorted({e.fold for e in entries if e.fold is not None}),
        "rounds": sorted({e.round for e in entries if e.round is not None}),
        "first": entries[0].time,
        "last": entries[-1].time,
        "mechanisms": _unique([e.mechanism.to_dict() for e in entries]),
        "params": _unique([dict(e.params) for e in entries]),
        "epsilon_rdp": _num(epsilon_of([e.mechanism for e in entries], delta=delta)),
    }


def export_summary(
    path: Path,
    *,
    code_version: str,
    cap: float | None = None,
    key_path: Path | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
) -> dict[str, Any]:
    """Build and sign a review-board summary of the ledger at ``path``.

    Parameters
    ----------
    path : Path
        The ledger file.
    code_version : str
        Version of the code that produced the summary (package version, git commit).
    cap : float, optional
        The node's patient-level epsilon cap, to report remaining budgets.
    key_path : Path, optional
        The node's private key (default ``node-key.pem`` beside the ledger). It must exist:
        a summary signed by a fresh key would prove nothing.
    tolerance : float, optional
        Passed to :func:`~common.ledger.verify_ledger`.

    Returns
    -------
    dict
        The summary, with ``signature`` (base64 Ed25519) and ``public_key`` (PEM).

    Raises
    ------
    LedgerError
        If the ledger or the key is missing, or a line is unreadable.
    """
    path = Path(path)
    key = load_private_key(key_path or path.parent / "node-key.pem")
    report = verify_ledger(path, public_key=public_pem(key), tolerance=tolerance)
    try:
        records = Ledger(path, key_path=key_path).read().records
    except LedgerError:
        records = ()  # damaged beyond reading: the verification problems say where
    groups: dict[tuple[str, str], list[LedgerEntry]] = {}
    for record in records:
        groups.setdefault((record.entry.fingerprint, record.entry.level), []).append(record.entry)
    datasets = []
    for (fingerprint, level), entries in groups.items():
        spend = spend_of(fingerprint, entries, level=level)
        indep = next((d.epsilon_independent for d in report.datasets
                      if d.fingerprint == fingerprint and d.level == level), math.nan)
        runs = list(spend.runs)
        patient_cap = cap if level == "patient" else None
        datasets.append({
            "fingerprint": fingerprint,
            "level": level,
            "unit_of_privacy": {"patient": "patient", "hospital": "hospital"}.get(
                level, "none: exact releases without a DP guarantee"),
            "dataset_size": max(e.dataset_size for e in entries),
            "delta": spend.delta,
            "epsilon_rdp": _num(spend.epsilon_rdp),
            "epsilon_prv": _num(spend.epsilon_prv),
            "epsilon_independent": _num(indep),
            "cap": patient_cap,
            "remaining": (_num(max(0.0, patient_cap - spend.epsilon_rdp))
                          if patient_cap is not None else None),
            "entries": spend.entries,
            "runs": [_run_summary(r, [e for e in entries if e.run_id == r], spend.delta)
                     for r in runs],
        })
    data = path.read_bytes()
    summary: dict[str, Any] = {
        "format": SUMMARY_FORMAT,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version,
        "accounting": {
            "of_record": "opacus-rdp",
            "also": ["opacus-prv", "dp_accounting-rdp"],
            "tolerance": tolerance,
            "delta_rule": "each dataset is composed at the smallest delta of its entries",
        },
        "ledger": {
            "file": path.name,
            "sha256": hashlib.sha256(data).hexdigest(),
            "records": report.records,
            "head_hash": records[-1].hash if records else None,
            "verified": report.ok,
            "problems": [{"index": p.index, "line": p.line, "reason": p.reason}
                         for p in report.problems],
        },
        "key_id": key_id(key.public_key()),
        "public_key": public_pem(key).decode("ascii"),
        "datasets": datasets,
    }
    summary["signature"] = sign(key, canonical_json(summary))
    return summary


def verify_summary(summary: dict[str, Any], public_key: Path | bytes) -> bool:
    """True when ``summary`` is unmodified and signed by ``public_key``'s private half.

    Pass the node's public key as known to the board (not the copy embedded in the summary,
    which only shows the summary is self-consistent).
    """
    if not isinstance(summary, dict) or not isinstance(summary.get("signature"), str):
        return False
    body = copy.deepcopy(summary)
    signature = body.pop("signature")
    try:
        data = canonical_json(body)
    except (TypeError, ValueError):
        return False
    return verify_signature(load_public_key(public_key), data, signature)
