"""Locate the shared real datasets (MedMNIST, UCI Heart Disease, ...) used by tests and benches.

The data never lives in this repository. It is found, in order, at ``$VESALIUS_SHARED_DATA``
or at ``<repo>/../shared/data``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "VESALIUS_SHARED_DATA"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """Return the shared data folder, or ``None`` when it is not present."""
    env = os.environ.get(ENV_VAR)
    candidates = [Path(env)] if env else []
    candidates.append(_REPO_ROOT.parent / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


def require_shared_file(relative: str) -> Path:
    """Return ``<shared data>/relative`` or raise ``FileNotFoundError`` with a clear hint."""
    root = shared_data_dir()
    if root is None:
        raise FileNotFoundError(
            f"shared datasets not found: set {ENV_VAR} to the folder holding "
            "'medmnist/' (usually ../shared/data beside the repository)"
        )
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(f"{relative} not found under {root} (set {ENV_VAR})")
    return path
