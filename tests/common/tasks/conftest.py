"""Fixtures of this folder: every test runs with one torch thread (see tests/torch_helpers.py)."""

from __future__ import annotations

from tests.torch_helpers import one_torch_thread

__all__ = ["one_torch_thread"]
