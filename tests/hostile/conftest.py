"""Fixtures and hypothesis settings of the hostile-input harness.

Every base file is built once per session from pydicom's bundled examples, with its own
planted identifiers (drawn from a fixed seed, so every run writes the same files).
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, Phase, settings

from tests.hostile._mutate import COMPRESSED_BASES, NATIVE_BASES, Planted, build_base

#: Reproducible, modest hypothesis runs (CI-stable: derandomised, no example database).
HOSTILE = settings(
    max_examples=20,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),  # failures are reported as found, not shrunk
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                           HealthCheck.data_too_large],
)


class Bases(dict[str, tuple[Planted, bytes]]):
    """``name -> (planted values, file bytes)``; a short repr for hypothesis reports."""

    def __repr__(self) -> str:
        return f"<{len(self)} base files: {', '.join(self)}>"


@pytest.fixture(scope="session")
def bases() -> Bases:
    """``name -> (planted values, file bytes)`` for every base file."""
    rng = random.Random(13)
    out = Bases()
    for i, name in enumerate((*NATIVE_BASES, *COMPRESSED_BASES)):
        planted = Planted.draw(rng, label=i % 2)
        out[name] = (planted, build_base(name, planted))
    return out
