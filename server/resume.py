"""Resuming a run after the coordinator died: its saved state, and the run it was running.

Two records make a run resumable:

``<out dir>/resume-state.json``
    Written with ``report.json`` after every training and evaluation phase
    (:func:`save_state`): the run id the nodes' ledgers know the run by, every round's log (site
    replies with their node ids, errors, failures), the nodes excluded, the hospitals that
    dropped, node id -> site names and the hospital-level DP releases. With the round
    checkpoints (``checkpoints/round-<r>.pt``) it is all :func:`load_state` needs to continue
    from the last aggregated round.
``<coordinator state dir>/active-run.json``
    Written by a deployed ServerApp when it starts a run (:func:`write_active_run`; the state
    dir comes from ``VESALIUS_COORDINATOR_DIR``, which ``vesalius coordinator start`` sets) and
    marked finished when the run ends. ``vesalius coordinator start --resume`` reads it
    (:func:`read_active_run`) and resubmits the run config with ``resume-from``.

Neither record holds patient data: only what the nodes released (aggregates, epsilon).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from server.report import atomic_write
from server.strategies.fedavg import RoundLog, SiteReply

STATE_FILE = "resume-state.json"
ACTIVE_RUN_FILE = "active-run.json"
COORDINATOR_DIR_ENV = "VESALIUS_COORDINATOR_DIR"
STATE_VERSION = 1


@dataclass
class ResumeState:
    """What a run had done when it stopped.

    Attributes
    ----------
    run_id : str
        The plan's run id (the nodes' ledgers record their spends under it).
    rounds : list of RoundLog
        Every round logged so far (possibly a last one that did not finish).
    excluded : dict
        Node id -> the reason it refused the plan.
    dropped : dict
        Site -> when it stopped answering (and when it came back).
    sites : dict
        Node id -> site name.
    hospital_dp_releases : int
        Hospital-level DP releases composed so far (0 without hospital-level DP).
    """

    run_id: str
    rounds: list[RoundLog] = field(default_factory=list)
    excluded: dict[int, str] = field(default_factory=dict)
    dropped: dict[str, dict[str, Any]] = field(default_factory=dict)
    sites: dict[int, str] = field(default_factory=dict)
    hospital_dp_releases: int = 0

    def last_aggregated_round(self, checkpoint_dir: Path) -> int:
        """The last round whose training was aggregated and whose checkpoint is on disk."""
        done = [e.round for e in self.rounds
                if e.status == "aggregated" and e.train
                and (checkpoint_dir / f"round-{e.round}.pt").is_file()]
        return max(done, default=0)


def _atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, text)


def save_state(out_dir: Path, state: ResumeState) -> None:
    """Write ``resume-state.json`` atomically (NaN kept: it is read back only by Python)."""
    doc = {
        "version": STATE_VERSION,
        "run_id": state.run_id,
        "rounds": [dataclasses.asdict(entry) for entry in state.rounds],
        "excluded": {str(n): why for n, why in state.excluded.items()},
        "dropped": state.dropped,
        "sites": {str(n): site for n, site in state.sites.items()},
        "hospital_dp_releases": state.hospital_dp_releases,
    }
    _atomic(out_dir / STATE_FILE, json.dumps(doc, default=str))


def _round(doc: Mapping[str, Any]) -> RoundLog:
    replies = {key: [SiteReply(**r) for r in doc.get(key, [])] for key in ("train", "evaluate")}
    return RoundLog(
        round=int(doc["round"]), train=replies["train"], evaluate=replies["evaluate"],
        errors=list(doc.get("errors", [])), refusals=list(doc.get("refusals", [])),
        train_metrics=dict(doc.get("train_metrics", {})),
        evaluate_metrics=dict(doc.get("evaluate_metrics", {})),
        status=str(doc.get("status", "aggregated")), failure=str(doc.get("failure", "")),
    )


def load_state(out_dir: Path) -> ResumeState:
    """The saved state of the run whose output folder is ``out_dir``.

    Raises
    ------
    ConfigError
        If the folder holds no readable state (not a run's output folder, or written by a
        version that kept none).
    """
    path = out_dir / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"{out_dir} holds no resumable run ({STATE_FILE} is missing): give the output "
            "folder of the run to resume (its --out)")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return ResumeState(
            run_id=str(doc["run_id"]),
            rounds=[_round(r) for r in doc.get("rounds", [])],
            excluded={int(n): str(why) for n, why in doc.get("excluded", {}).items()},
            dropped=dict(doc.get("dropped", {})),
            sites={int(n): str(site) for n, site in doc.get("sites", {}).items()},
            hospital_dp_releases=int(doc.get("hospital_dp_releases", 0)),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path.name} in {out_dir} cannot be read ({type(exc).__name__}); "
                          "the run cannot be resumed") from None


def coordinator_dir() -> Path | None:
    """The coordinator's state dir when this ServerApp runs under ``vesalius coordinator``."""
    value = os.environ.get(COORDINATOR_DIR_ENV, "")
    return Path(value) if value else None


def write_active_run(state_dir: Path, out_dir: Path, run_config: Mapping[str, Any]) -> None:
    """Record the run a deployed ServerApp is running (status ``running``)."""
    doc = {"out_dir": str(out_dir.resolve()), "status": "running",
           "run_config": {str(key): value for key, value in run_config.items()}}
    _atomic(state_dir / ACTIVE_RUN_FILE, json.dumps(doc, indent=2, default=str))


def finish_active_run(state_dir: Path, out_dir: Path, status: str) -> None:
    """Mark the recorded run finished (with the report's status), if it is this one."""
    path = state_dir / ACTIVE_RUN_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if doc.get("out_dir") == str(out_dir.resolve()):
        doc["status"], doc["report_status"] = "finished", status
        _atomic(path, json.dumps(doc, indent=2, default=str))


def read_active_run(state_dir: Path) -> dict[str, Any] | None:
    """The run the coordinator was running when it stopped, or None.

    Returns ``{"out_dir": str, "run_config": {run-config key: value}, "status": "running"}``
    for a run that did not finish; None when there is no record, it finished, or it cannot
    be read.
    """
    try:
        doc = json.loads((state_dir / ACTIVE_RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("status") != "running":
        return None
    if not isinstance(doc.get("out_dir"), str) or not isinstance(doc.get("run_config"), dict):
        return None
    return doc
