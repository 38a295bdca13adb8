"""Shared fixtures.

Tests that need the real datasets under ``../shared/data`` use ``shared_file``: it skips with a
clear reason when the folder is absent (a user's fresh clone), but fails when ``CI=true``,
where the folder is always present.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from common.shared_data import ENV_VAR, shared_data_dir

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")


@pytest.fixture(autouse=True)
def _private_vesalius_home(tmp_path_factory: pytest.TempPathFactory,
                           monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own ``VESALIUS_HOME``: node privacy ledgers (which persist a
    dataset's spend across runs) never leak between tests or into the user's home."""
    home = tmp_path_factory.mktemp("vesalius-home")
    monkeypatch.setenv("VESALIUS_HOME", str(home))
    return home


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.fixture
def shared_file() -> Callable[[str], Path]:
    """Return a function mapping a path relative to the shared data folder to a real file."""

    def _get(relative: str) -> Path:
        root = shared_data_dir()
        path = root / relative if root is not None else None
        if path is None or not path.is_file():
            msg = (
                f"shared dataset {relative!r} not available "
                f"(set {ENV_VAR} or place ../shared/data beside the repository)"
            )
            if _in_ci():
                pytest.fail(msg + " -- it must be present in CI")
            pytest.skip(msg)
        return path

    return _get
