"""How ε and a remaining budget are rounded for people to read.

Every screen, page and table rounds a privacy loss *up* at the precision it shows and a
remaining budget *down*, so that no display understates what was spent or overstates what is
left: the terminal's round line and the report's per-round table show the same figure.
"""

from __future__ import annotations

import math

__all__ = ["budget_shown", "budget_text", "epsilon_shown", "epsilon_text"]

_TOLERANCE = 1e-9
"""A value that is a whole number of display units up to float error (``8.0`` stored as
``8.000000000000002``) is not pushed to the next unit."""


def epsilon_shown(value: float, decimals: int) -> float:
    """``value`` (an ε) rounded up to ``decimals`` decimals."""
    scale = 10 ** decimals
    return math.ceil(value * scale - _TOLERANCE) / scale


def budget_shown(value: float, decimals: int) -> float:
    """``value`` (an ε budget still available) rounded down to ``decimals`` decimals."""
    scale = 10 ** decimals
    return math.floor(value * scale + _TOLERANCE) / scale


def epsilon_text(value: float, decimals: int) -> str:
    """:func:`epsilon_shown` as text with ``decimals`` decimals (a finite ``value``)."""
    return f"{epsilon_shown(value, decimals):.{decimals}f}"


def budget_text(value: float, decimals: int) -> str:
    """:func:`budget_shown` as text with ``decimals`` decimals (a finite ``value``)."""
    return f"{budget_shown(value, decimals):.{decimals}f}"
