"""Mechanism and LedgerEntry validation and round trips."""

from __future__ import annotations

import math

import pytest

from common.errors import ConfigError
from common.ledger import LedgerEntry, Mechanism
from tests.common.ledger.conftest import entry


@pytest.mark.parametrize(
    "mechanism",
    [
        Mechanism("subsampled-gaussian", noise_multiplier=1.3, sample_rate=0.02, steps=50),
        Mechanism("gaussian", noise_multiplier=4.0, steps=3),
        Mechanism("laplace", epsilon=0.25, steps=2),
        Mechanism("subsampled-gaussian", noise_multiplier=0.0, sample_rate=0.5, steps=0),
    ],
)
def test_mechanism_round_trips_through_a_dict(mechanism: Mechanism) -> None:
    assert Mechanism.from_dict(mechanism.to_dict()) == mechanism


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ({"kind": "exponential"}, "kind must be one of"),
        ({"kind": "gaussian", "noise_multiplier": -1.0}, "noise_multiplier"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "sample_rate": 0.5}, "subsampled-gaussian"),
        ({"kind": "subsampled-gaussian", "noise_multiplier": 1.0, "sample_rate": 0.0}, "(0, 1]"),
        ({"kind": "laplace"}, "epsilon > 0"),
        ({"kind": "laplace", "epsilon": 1.0, "noise_multiplier": 2.0}, "epsilon only"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "epsilon": 1.0}, "laplace mechanisms only"),
        ({"kind": "gaussian", "noise_multiplier": 1.0, "steps": 1.5}, "steps"),
        ({"kind": "gaussian", "noise_multiplier": float("nan")}, "finite"),
        ({"kind": "gaussian", "sigma": 1.0}, "unknown mechanism keys"),
        ({"noise_multiplier": 1.0}, "needs a 'kind'"),
    ],
)
def test_invalid_mechanisms_raise_a_clear_config_error(data: dict, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        Mechanism.from_dict(data)


def test_entry_round_trips_including_an_infinite_reported_epsilon() -> None:
    original = entry(epsilon_reported=math.inf)
    doc = original.to_dict()
    assert doc["epsilon_reported"] == "inf"
    assert LedgerEntry.from_dict(doc) == original


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"delta": 0.0}, "delta"),
        ({"level": "image"}, "level"),
        ({"fingerprint": ""}, "fingerprint"),
        ({"round": -1}, "round"),
        ({"params": {"nested": {"a": 1}}}, "JSON scalar"),
        ({"epsilon_reported": -0.5}, "epsilon_reported"),
    ],
)
def test_invalid_entries_raise(change: dict, words: str) -> None:
    doc = entry().to_dict()
    doc.update(change)
    with pytest.raises(ConfigError, match=words):
        LedgerEntry.from_dict(doc)
