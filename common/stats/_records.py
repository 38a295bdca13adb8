"""Flat records of mergeable statistics: what a Flower ``MetricRecord`` holds.

A ``MetricRecord`` accepts ``int``, ``float``, ``list[int]`` and ``list[float]`` values only
(no NumPy scalars, no nested lists), so matrices travel row-major and flattened, with their
shape in separate integer keys. These helpers build such values and read them back with the
same checks as :mod:`common.stats._checks` (non-negative integral counts, finite sums), so a
record that a node did not produce is refused with a :class:`~common.errors.DataError`
rather than silently coerced.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from common.errors import DataError
from common.stats._checks import count, require_keys

RecordValue = int | float | list[int] | list[float]
Record = dict[str, RecordValue]

_SAFE = "invalid statistics input"

T = TypeVar("T")


def int_list(values: npt.ArrayLike) -> list[int]:
    """Flatten (row-major) to a list of Python ints."""
    return [int(v) for v in np.asarray(values).ravel()]


def float_list(values: npt.ArrayLike) -> list[float]:
    """Flatten (row-major) to a list of Python floats."""
    return [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def get_count(record: Mapping[str, Any], key: str) -> int:
    """A non-negative integer count stored under ``key``."""
    require_keys(record, [key], "statistics record")
    return count(record[key], key)


def get_float(record: Mapping[str, Any], key: str) -> float:
    """A finite float stored under ``key``."""
    require_keys(record, [key], "statistics record")
    v = float(record[key])
    if not math.isfinite(v):
        raise DataError(f"{key} must be finite, got {record[key]!r}", safe_reason=_SAFE)
    return v


def get_array(
    record: Mapping[str, Any], key: str, shape: tuple[int, ...], *, counts: bool
) -> np.ndarray:
    """The flattened list under ``key`` reshaped to ``shape`` (int64 counts or float64 sums)."""
    require_keys(record, [key], "statistics record")
    return as_array(record[key], shape, counts=counts, name=key)


def as_array(
    values: npt.ArrayLike, shape: tuple[int, ...], *, counts: bool, name: str
) -> np.ndarray:
    """Validate ``values`` as an array of ``shape``: counts (int64, >= 0) or finite floats.

    The result is a read-only copy, so that frozen dataclasses holding it stay immutable.
    """
    arr = np.array(values, dtype=np.float64)
    if arr.size != math.prod(shape):
        raise DataError(f"{name} has {arr.size} values, expected shape {shape}",
                        safe_reason=_SAFE)
    arr = arr.reshape(shape)
    if not np.all(np.isfinite(arr)):
        raise DataError(f"{name} contains NaN or infinite values", safe_reason=_SAFE)
    if counts:
        if np.any(arr < 0) or np.any(arr != np.round(arr)):
            raise DataError(f"{name} must hold non-negative integer counts (round noised "
                            "counts with common.stats.round_noisy_counts first)",
                            safe_reason=_SAFE)
        arr = arr.astype(np.int64)
    arr.setflags(write=False)
    return arr


def same(what: str, a: object, b: object) -> None:
    """Refuse to merge statistics taken on different layouts (classes, bins, edges)."""
    if a != b:
        raise DataError(f"cannot merge statistics with different {what}: {a!r} and {b!r}",
                        safe_reason="statistics from different configurations")


def merge_all(items: Iterable[T]) -> T:
    """Merge mergeable statistics (``a + b + ...``); at least one item.

    Examples
    --------
    >>> merge_all(per_site_stats)  # doctest: +SKIP
    """
    seq = list(items)
    if not seq:
        raise DataError("no site statistics to merge", safe_reason=_SAFE)
    return functools.reduce(operator.add, seq)
