"""One privacy mechanism as the ledger records it (what was released, with what noise).

A :class:`Mechanism` is a raw event, not an epsilon: the ledger stores the parameters of the
mechanism so that any accountant (Opacus's here, Google's ``dp_accounting`` in the auditor)
can recompute the spend from them.

Kinds
-----
``"subsampled-gaussian"``
    ``steps`` compositions of the Poisson-subsampled Gaussian mechanism (one DP-SGD step each):
    every record is included with probability ``sample_rate``; Gaussian noise of standard
    deviation ``noise_multiplier`` times the L2 sensitivity (the clipping norm) is added.
``"gaussian"``
    ``steps`` compositions of the plain Gaussian mechanism (e.g. a noised statistic): noise
    std / L2 sensitivity = ``noise_multiplier``; ``sample_rate`` is 1.
``"laplace"``
    ``steps`` compositions of a Laplace mechanism that is ``epsilon``-DP (pure DP) per step,
    i.e. Laplace noise of scale ``L1 sensitivity / epsilon``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from common.errors import ConfigError

__all__ = ["KINDS", "Mechanism"]

KINDS = ("subsampled-gaussian", "gaussian", "laplace")
"""Mechanism kinds the ledger understands."""

_FIELDS = ("kind", "noise_multiplier", "sample_rate", "steps", "epsilon")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"mechanism {name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"mechanism {name} must be finite, got {value!r}")
    return number


@dataclass(frozen=True)
class Mechanism:
    """A privacy mechanism and how many times it was composed.

    Parameters
    ----------
    kind : {"subsampled-gaussian", "gaussian", "laplace"}
        See the module docstring.
    noise_multiplier : float, optional
        Gaussian noise std divided by the L2 sensitivity (both Gaussian kinds); >= 0. Zero means
        no noise: the release has no DP guarantee and its epsilon is infinite.
    sample_rate : float, optional
        Poisson sampling probability per step, in (0, 1]; ``"subsampled-gaussian"`` only
        (must be 1.0 for the other kinds).
    steps : int, optional
        Number of compositions of this mechanism; >= 0.
    epsilon : float, optional
        Pure-DP epsilon per step; ``"laplace"`` only (> 0), 0.0 for the other kinds.

    Raises
    ------
    ConfigError
        If a value is missing, out of range or does not belong to ``kind``.
    """

    kind: str
    noise_multiplier: float = 0.0
    sample_rate: float = 1.0
    steps: int = 1
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"mechanism kind must be one of {KINDS}, got {self.kind!r}")
        noise = _number("noise_multiplier", self.noise_multiplier)
        rate = _number("sample_rate", self.sample_rate)
        eps = _number("epsilon", self.epsilon)
        if (isinstance(self.steps, bool) or not isinstance(self.steps, numbers.Integral)
                or self.steps < 0):
            raise ConfigError(f"mechanism steps must be an integer >= 0, got {self.steps!r}")
        object.__setattr__(self, "steps", int(self.steps))
        if noise < 0:
            raise ConfigError(f"noise_multiplier must be >= 0, got {noise}")
        if not 0.0 < rate <= 1.0:
            raise ConfigError(f"sample_rate must lie in (0, 1], got {rate}")
        if self.kind == "laplace":
            if not eps > 0:
                raise ConfigError(f"a laplace mechanism needs epsilon > 0 per step, got {eps}")
            if noise != 0.0 or rate != 1.0:
                raise ConfigError(
                    "a laplace mechanism is described by its epsilon only: leave "
                    "noise_multiplier=0 and sample_rate=1"
                )
        else:
            if eps != 0.0:
                raise ConfigError(
                    f"epsilon is for laplace mechanisms only; a {self.kind} mechanism is "
                    "described by noise_multiplier (and sample_rate)"
                )
            if self.kind == "gaussian" and rate != 1.0:
                raise ConfigError(
                    "a gaussian mechanism has sample_rate=1; use kind='subsampled-gaussian' "
                    "for Poisson-sampled releases"
                )
        object.__setattr__(self, "noise_multiplier", noise)
        object.__setattr__(self, "sample_rate", rate)
        object.__setattr__(self, "epsilon", eps)

    @property
    def is_gaussian(self) -> bool:
        """True for both Gaussian kinds (their RDP curves come from the same analysis)."""
        return self.kind != "laplace"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict with the five fields (snake_case keys)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Mechanism:
        """Inverse of :meth:`to_dict`.

        Raises
        ------
        ConfigError
            If ``data`` is not a mapping, has unknown or missing keys, or invalid values.
        """
        if not isinstance(data, Mapping):
            raise ConfigError(f"a mechanism must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_FIELDS))
        if unknown:
            raise ConfigError(f"unknown mechanism keys {unknown}; expected {list(_FIELDS)}")
        if "kind" not in data:
            raise ConfigError("a mechanism needs a 'kind'")
        return cls(**{key: data[key] for key in _FIELDS if key in data})
