"""Pooling node statistics: addition, and post-processing of noised counts.

Every node statistic in :mod:`common.stats` is a sum over patients, so pooling is addition
(:func:`sum_stats`), and secure aggregation, which reveals only the sum, can replace it without
changing any estimator.

If a node adds Gaussian noise to counts (differential privacy), the released values are no
longer non-negative integers; :func:`round_noisy_counts` maps them back (rounding and clipping at
zero are post-processing and do not weaken the DP guarantee). Estimates from noised statistics
no longer equal the pooled-data computation exactly.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import DataError

_SAFE = "invalid statistics input"


def sum_stats(site_stats: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Add node statistics key by key (numbers and equal-shape arrays).

    This is the only pooling operation the coordinator needs: every node statistic in this
    package is a sum over patients, so pooling is addition (and secure aggregation, which
    yields only the sum, can replace it without changing any estimator).
    """
    if len(site_stats) == 0:
        raise DataError("no site statistics to pool", safe_reason=_SAFE)
    keys = list(site_stats[0].keys())
    out: dict[str, Any] = {}
    for s in site_stats:
        if sorted(s.keys()) != sorted(keys):
            raise DataError("site statistics have different keys", safe_reason=_SAFE)
    for key in keys:
        vals = [np.asarray(s[key], dtype=np.float64) for s in site_stats]
        shapes = {v.shape for v in vals}
        if len(shapes) != 1:
            raise DataError(f"statistic {key!r} has different shapes across sites",
                            safe_reason=_SAFE)
        total = np.sum(vals, axis=0)
        out[key] = float(total) if total.ndim == 0 else total
    return out


def round_noisy_counts(values: npt.ArrayLike) -> np.ndarray:
    """Round noised counts to the nearest integer and clip at 0 (int64, same shape)."""
    arr = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(arr)):
        raise DataError("noised counts must be finite", safe_reason=_SAFE)
    return np.clip(np.rint(arr), 0, None).astype(np.int64)
