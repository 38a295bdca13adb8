"""Input validation shared by the statistics modules (clear errors, never silent coercion)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError, DataError

_SAFE = "invalid statistics input"


def as_scores(values: npt.ArrayLike, name: str = "scores") -> np.ndarray:
    """Return ``values`` as a finite, non-empty 1-D float64 array, or raise :class:`DataError`.

    An empty array means a site without held-out patients; it is refused rather than
    released as zeros, so that the caller decides explicitly to leave such a site out.
    """
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}", safe_reason=_SAFE)
    if arr.size == 0:
        raise DataError(f"{name} is empty: no held-out patients at this site",
                        safe_reason="no held-out patients at this site")
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values", safe_reason=_SAFE)
    return arr


def as_labels(values: npt.ArrayLike, n: int | None = None, name: str = "labels") -> np.ndarray:
    """Return binary labels (0/1 or bool) as a 1-D bool array of length ``n``."""
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise DataError(f"{name} must be 1-D, got shape {arr.shape}", safe_reason=_SAFE)
    if arr.dtype != bool:
        if arr.size and not np.all(np.isin(arr, (0, 1))):
            raise DataError(f"{name} must be binary (0/1)", safe_reason=_SAFE)
        arr = arr.astype(bool)
    if n is not None and arr.shape[0] != n:
        raise DataError(
            f"{name} has length {arr.shape[0]} but the scores have length {n}",
            safe_reason=_SAFE,
        )
    return arr


def count(value: Any, name: str) -> int:
    """A non-negative integer count (floats allowed only if integral)."""
    v = float(value)
    if not np.isfinite(v) or v < 0 or v != round(v):
        raise DataError(f"{name} must be a non-negative integer count, got {value!r}",
                        safe_reason=_SAFE)
    return int(round(v))


def counts_array(values: npt.ArrayLike, name: str) -> np.ndarray:
    """A 1-D array of non-negative integer counts, as int64."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise DataError(f"{name} must be a non-empty 1-D array of counts", safe_reason=_SAFE)
    if not np.all(np.isfinite(arr)) or np.any(arr < 0) or np.any(arr != np.round(arr)):
        raise DataError(f"{name} must hold non-negative integer counts", safe_reason=_SAFE)
    return arr.astype(np.int64)


def alpha_level(alpha: float) -> float:
    """A significance level in (0, 1)."""
    a = float(alpha)
    if not 0.0 < a < 1.0:
        raise ConfigError(f"alpha must lie in (0, 1), got {alpha!r}")
    return a


def require_keys(stats: Mapping[str, Any], keys: Sequence[str], what: str) -> None:
    """Raise :class:`DataError` naming the keys that ``stats`` lacks."""
    missing = [k for k in keys if k not in stats]
    if missing:
        raise DataError(f"{what} lacks {missing}", safe_reason=_SAFE)
