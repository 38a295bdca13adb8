"""Helpers to drive Flower's own executables (SuperNode, ``flwr run``) from the CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent.parent  # the folder holding pyproject.toml
CONNECTION = "vesalius"


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """Environment for Flower processes: no telemetry, no update check, no runtime installs."""
    env = dict(os.environ)
    # Flower's executables start helpers (flower-superexec, flwr-clientapp) by name.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    env.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    env.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    return env


def executable(name: str) -> str:
    """Path of a Flower console script installed beside this Python."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found: is flwr installed in this environment?")
    return found


def write_connection(flwr_home: Path, address: str, *, insecure: bool, root_cert: Path | None) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one SuperLink connection named ``vesalius``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    lines = [
        "[superlink]",
        f'default = "{CONNECTION}"',
        "",
        f"[superlink.{CONNECTION}]",
        f'address = "{address}"',
    ]
    if insecure:
        lines.append("insecure = true")
    if root_cert is not None:
        lines.append(f'root-certificates = "{root_cert}"')
    (flwr_home / "config.toml").write_text("\n".join(lines) + "\n", encoding="utf-8")


def toml_value(value: object) -> str:
    """Render a run-config value as TOML for ``--run-config``/``--node-config``.

    Strings become TOML basic strings (JSON's string escapes are valid TOML escapes), except
    a string holding a double quote or a backslash (a JSON text such as ``paradigm-options``):
    Flower splits ``--run-config`` with a pattern that ends a double-quoted value at the first
    ``"``, escaped or not, so such a string goes as a TOML literal string, ``'...'``, which
    needs no escapes. A string holding both quote kinds, or a line break, cannot be passed.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if ('"' in text or "\\" in text) and "'" not in text and "\n" not in text:
        return f"'{text}'"
    return json.dumps(text)
