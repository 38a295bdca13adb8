"""The result type of an interval estimate."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval.

    Attributes
    ----------
    value, lower, upper
        Point estimate and interval bounds (NaN when undefined, e.g. an empty denominator).
    se
        Standard error on the reported scale, when the method has one (NaN otherwise).
    n
        The denominator the estimate rests on (patients, pairs, ...).
    method
        How the interval was computed, e.g. ``"wilson"``.
    """

    value: float
    lower: float
    upper: float
    se: float = math.nan
    n: int = 0
    method: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite numbers become ``None``."""
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()}
