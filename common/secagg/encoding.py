"""Stochastic fixed-point encoding of real vectors into the ring Z_{2^64}.

A value ``x`` is encoded as ``floor(x * 2^f + U)`` with ``U ~ Uniform[0, 1)`` (stochastic
rounding: unbiased, so small updates are not rounded to zero), stored as the two's
complement ``uint64``. Sums wrap modulo 2^64 like the masks; decoding the (unmasked) sum of
``n`` encodings returns the sum of the values within ``n * 2^-f`` per coordinate.

The fractional bits ``f`` are sized from the number of nodes and the bound on one node's
values, so that ``n * (bound * 2^f + 1) <= 2^62``: the sum never leaves the int64 range and
decodes without wrapping. A configuration that leaves fewer than
:data:`MIN_FRACTIONAL_BITS` is refused.
"""

from __future__ import annotations

import math

import numpy as np

from common.errors import ConfigError

__all__ = [
    "MAX_FRACTIONAL_BITS",
    "MIN_FRACTIONAL_BITS",
    "decode",
    "encode",
    "fractional_bits",
    "quantisation_bound",
]

MIN_FRACTIONAL_BITS = 8  # coarser than 1/256 would visibly distort an aggregate
MAX_FRACTIONAL_BITS = 40  # finer buys nothing: values are float64 (53-bit mantissa)
_LIMIT = 2**62  # one bit of headroom below int64 for float64 rounding


def fractional_bits(*, num_nodes: int, value_bound: float, integer: bool = False) -> int:
    """The fractional bits for ``num_nodes`` values each within ``[-value_bound, value_bound]``.

    Parameters
    ----------
    num_nodes : int
        Nodes whose encodings are summed (>= 1).
    value_bound : float
        Bound on the absolute value of every coordinate a node encodes (> 0).
    integer : bool
        Integer values (counts): 0 fractional bits, only the range is checked.

    Raises
    ------
    ConfigError
        When even :data:`MIN_FRACTIONAL_BITS` (or, for integers, none) cannot hold the sum.
    """
    if num_nodes < 1 or not (math.isfinite(value_bound) and value_bound > 0):
        raise ConfigError("secure aggregation needs >= 1 node and a finite value bound > 0")
    lowest = 0 if integer else MIN_FRACTIONAL_BITS
    highest = 0 if integer else MAX_FRACTIONAL_BITS
    for bits in range(highest, lowest - 1, -1):
        if num_nodes * (math.ceil(value_bound * 2.0**bits) + 1) <= _LIMIT:
            return bits
    raise ConfigError(
        f"secure aggregation cannot sum {num_nodes} nodes' values up to {value_bound:g} in a "
        "64-bit ring; lower the clip (hospital-dp-clip) or the number of nodes per round"
    )


def encode(values: np.ndarray, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Stochastic fixed-point encoding of ``values`` (float) with ``bits`` fractional bits."""
    scaled = np.asarray(values, dtype=np.float64) * float(2**bits)
    if bits == 0 and np.all(np.equal(np.mod(scaled, 1.0), 0.0)):
        floored = scaled  # integers stay exact, no randomness needed
    else:
        floored = np.floor(scaled + rng.random(scaled.shape))
    return floored.astype(np.int64).view(np.uint64)


def decode(total: np.ndarray, bits: int) -> np.ndarray:
    """The real-valued sum that ``total`` (a sum of encodings, mod 2^64) encodes."""
    signed = np.asarray(total, dtype=np.uint64).view(np.int64)
    return signed.astype(np.float64) / float(2**bits)


def quantisation_bound(num_nodes: int, bits: int) -> float:
    """Largest absolute error of a decoded sum of ``num_nodes`` encodings, per coordinate.

    Each stochastic rounding moves a value by less than one step ``2^-bits``.
    """
    return num_nodes * 2.0**-bits
