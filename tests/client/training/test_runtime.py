"""oneDNN primitive-cache setting applied when the training package is imported."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import client.training
from client.training import runtime
from client.training.runtime import (
    ONEDNN_CACHE_CAPACITY,
    ONEDNN_CACHE_ENV,
    configure_onednn_cache,
)

ROOT = Path(__file__).resolve().parents[3]


def _env_after_import() -> dict[str, str]:
    """Import ``client.training`` in a fresh interpreter; return the two oneDNN variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in (ONEDNN_CACHE_ENV, "DNNL_PRIMITIVE_CACHE_CAPACITY")}
    env["PYTHONPATH"] = str(ROOT)
    code = (
        "import os, client.training\n"
        f"print(os.environ.get({ONEDNN_CACHE_ENV!r}, '-'))\n"
        "print(os.environ.get('DNNL_PRIMITIVE_CACHE_CAPACITY', '-'))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    return {ONEDNN_CACHE_ENV: out[0], "DNNL": out[1]}


def test_import_sets_the_cache_capacity_in_a_fresh_process() -> None:
    assert _env_after_import() == {ONEDNN_CACHE_ENV: str(ONEDNN_CACHE_CAPACITY), "DNNL": "-"}
    assert ONEDNN_CACHE_CAPACITY > 1024  # above oneDNN's own default, or it changes nothing


def test_an_operator_setting_wins_under_either_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # re-running the package's import-time code in this process (a fresh one is tested above)
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "300")
    importlib.reload(client.training)
    assert os.environ[ONEDNN_CACHE_ENV] == "300"
    monkeypatch.delenv(ONEDNN_CACHE_ENV)
    monkeypatch.setenv("DNNL_PRIMITIVE_CACHE_CAPACITY", "200")
    importlib.reload(client.training)
    assert ONEDNN_CACHE_ENV not in os.environ  # oneDNN reads the older name then


def test_configure_returns_the_value_in_effect(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ONEDNN_CACHE_ENV, raising=False)
    monkeypatch.delenv("DNNL_PRIMITIVE_CACHE_CAPACITY", raising=False)
    assert configure_onednn_cache(5000) == "5000"
    assert os.environ[ONEDNN_CACHE_ENV] == "5000"
    assert configure_onednn_cache(7000) == "5000"  # set already: left alone
    monkeypatch.setenv(ONEDNN_CACHE_ENV, "")  # empty counts as unset
    assert configure_onednn_cache() == str(runtime.ONEDNN_CACHE_CAPACITY)


def test_negative_capacity_is_refused() -> None:
    with pytest.raises(ValueError, match="capacity"):
        configure_onednn_cache(-1)
