"""Released sums as exact integers for secure aggregation (the node's half).

When a statistics query arrives inside a secure-aggregation session and its config carries
:data:`FIXED_BITS_KEY`, the node's *released* values (after noise or small-cell
suppression, :mod:`client.release`) are re-encoded, so that the secure-aggregation mod
(:func:`client.secagg.secagg_mod`) can mask them as its integer segment:

* every released key ``K`` whose wire name ``K`` + :data:`SUFFIX` is in ``secagg-int-keys``
  becomes, under that name, two integer cells per value: ``x = round(v * 2^32) + OFFSET * 2^32`` split into ``hi = x >> 32`` and
  ``lo = x mod 2^32`` (hi cells first, then lo cells), each in ``[0, 2^32]`` as the mod
  requires. Values are clipped to ``[-OFFSET, OFFSET)`` first (post-processing of a released
  value). Integers are encoded exactly; a float is off by at most ``2^-33``;
* a key the query did not release (a hospital that does not consent to histograms) is sent as
  zeros, and :data:`PRESENT_KEY` holds 1 per key the node did release, so the coordinator
  knows over how many nodes each sum runs;
* every other released value is dropped from the reply (e.g. the node's own-site placement
  sums): under secure aggregation nothing per hospital leaves in the clear except the node's
  privacy accounting (epsilon), which the mod keeps.

The coordinator's half is :mod:`server.inference_secure` (same constants).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from common import messages as k
from common.errors import ConfigError

__all__ = ["FIXED_BITS", "FIXED_BITS_KEY", "OFFSET", "PRESENT_KEY", "SUFFIX",
           "encode_for_secure_sum",
           "is_secure_release"]

FIXED_BITS = 32
FIXED_BITS_KEY = "secagg-fixed-bits"  # config: the coordinator asks for this encoding
PRESENT_KEY = "secagg-present"  # integer cells: 1 per declared key the node released
OFFSET = 2**30  # values are clipped to [-OFFSET, OFFSET) and shifted by it
SUFFIX = ".fx"  # wire name of a released key's cells (the plain key keeps its plain meaning)


def is_secure_release(config: Mapping[str, Any]) -> bool:
    """Whether a query's config asks for the fixed-point re-encoding (see the module)."""
    return k.SECAGG_SESSION in config and FIXED_BITS_KEY in config


def _cells(value: Any) -> list[int]:
    arr = np.nan_to_num(np.atleast_1d(np.asarray(value, dtype=np.float64)).ravel(),
                        nan=0.0, posinf=float(OFFSET), neginf=-float(OFFSET))
    arr = np.clip(arr, -float(OFFSET), float(OFFSET) - 1.0)
    scale = 2**FIXED_BITS
    # v * 2^32 is exact in float64; Python ints keep the shifted value exact (up to 2^63).
    xs = [int(round(float(v) * scale)) + OFFSET * scale for v in arr]
    return [x >> FIXED_BITS for x in xs] + [x & (scale - 1) for x in xs]


def encode_for_secure_sum(values: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """The reply values of a secure release (see the module docstring).

    Parameters
    ----------
    values
        The released values (and flags) of the query.
    config
        The query's config (``secagg-int-keys`` and ``secagg-int-lengths`` name the keys and
        the cells the coordinator expects).
    """
    if int(config[FIXED_BITS_KEY]) != FIXED_BITS:  # type: ignore[call-overload]
        raise ConfigError("unsupported fixed-point encoding",
                          safe_reason=f"secure aggregation: {FIXED_BITS_KEY} must be "
                          f"{FIXED_BITS}")
    keys = [str(x) for x in config.get(k.SECAGG_INT_KEYS) or []]  # type: ignore[union-attr]
    lengths = [int(x) for x in config.get(k.SECAGG_INT_LENGTHS) or []]  # type: ignore[union-attr]
    out: dict[str, Any] = {}
    present: list[int] = []
    for wire, size in zip(keys, lengths):
        if not wire.endswith(SUFFIX):
            continue
        key = wire[: -len(SUFFIX)]
        cells = _cells(values[key]) if key in values else []
        if len(cells) != size:  # not released, or not the shape the coordinator expects
            cells = [0] * size
        present.append(1 if any(cells) else 0)
        out[wire] = cells
    out[PRESENT_KEY] = present
    if k.EPSILON in values:
        out[k.EPSILON] = values[k.EPSILON]
    return out
