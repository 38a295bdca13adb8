"""Drive the coordinator's SuperLink through Flower's own CLI (its Control API).

Every call is ``flwr <command> ... vesalius --format json`` with ``FLWR_HOME`` set to the
coordinator's ``<state dir>/flwr-home``, where ``vesalius coordinator start`` wrote the
``vesalius`` connection. Flower 1.42's CLI exits 0 even when the call failed and says so in
its JSON (``"success": false`` and an ``"error-message"``); :func:`flwr_json` turns that into
one sentence.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from cli.flower import CONNECTION, executable, flower_env
from common.errors import ConfigError, ConnectionProblem

__all__ = ["FlwrFailure", "flwr_command", "flwr_json"]

TIMEOUT_S = 60.0


class FlwrFailure(ConfigError):
    """The SuperLink answered and refused the request (e.g. ``Public key already in use``).

    Attributes
    ----------
    reason : str
        Flower's own last line, e.g. ``[code: 23] Public key already in use.``
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the SuperLink refused: {reason}", safe_reason="the SuperLink refused")
        self.reason = reason


def flwr_command(args: list[str], options: list[str] | None = None) -> list[str]:
    """``flwr <args> vesalius --format json <options>`` (the connection after the arguments)."""
    return [executable("flwr"), *args, CONNECTION, "--format", "json", *(options or [])]


def _last_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else "no reason given"


def flwr_json(args: list[str], flwr_home: Path, *, address: str,
              options: list[str] | None = None) -> dict[str, Any]:
    """Run one Flower CLI command against the coordinator and return its JSON answer.

    Parameters
    ----------
    args : list of str
        The command and its arguments before the connection name, e.g.
        ``["supernode", "ls"]``.
    flwr_home : Path
        ``FLWR_HOME`` holding the ``vesalius`` connection.
    address : str
        The SuperLink's address (for messages).
    options : list of str, optional
        Options after the connection name (e.g. ``["--run-config", "..."]``).

    Raises
    ------
    ConnectionProblem
        The SuperLink does not answer.
    FlwrFailure
        It answered with a refusal.
    """
    try:
        done = subprocess.run(flwr_command(args, options), env=flower_env(flwr_home), capture_output=True,
                              text=True, errors="replace", timeout=TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ConnectionProblem(f"the coordinator's SuperLink at {address} did not answer "
                                f"within {TIMEOUT_S:g} s",
                                safe_reason="the SuperLink did not answer") from None
    start = done.stdout.find("{")
    try:
        doc = json.loads(done.stdout[start:]) if start >= 0 else None
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise ConfigError(f"`flwr {' '.join(args[:2])}` gave no answer (exit {done.returncode}); "
                          "check that the flwr installed beside vesalius is version 1.42",
                          safe_reason="the Flower CLI gave no answer")
    if doc.get("success"):
        return doc
    message = str(doc.get("error-message", ""))
    lowered = message.lower()
    if any(word in lowered for word in ("ssl", "certificate", "handshake")):
        raise ConnectionProblem(
            f"the TLS handshake with the coordinator's SuperLink at {address} failed: start it "
            "again with `vesalius coordinator start` so that its connection names the CA "
            "certificate it serves", safe_reason="TLS handshake failed")
    if any(word in lowered for word in ("is unavailable", "failed to connect", "deadline")):
        raise ConnectionProblem(
            f"the coordinator's SuperLink does not answer at {address}: is `vesalius coordinator "
            "start` running with this --state-dir?", safe_reason="the SuperLink did not answer")
    raise FlwrFailure(_last_line(message))
