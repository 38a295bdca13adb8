"""A hospital's clinical covariates (one row per patient) for federated regression queries.

The format is that of the UCI Heart Disease ``processed.<site>.data`` files (Janosi et al.,
1988; doi:10.24432/C52P4X): comma-separated, no header, 14 fields per row, ``?`` for a missing
value, columns :data:`UCI_COLUMNS`. The rows are filtered as FLamby's Fed-Heart-Disease does
(and as ``shared/data/README.md`` states): the mostly-missing ``slope``, ``ca`` and ``thal``
columns are dropped and every row that still has a missing value is dropped, which leaves
303 / 261 / 46 / 130 rows for Cleveland / Hungary / Switzerland / Long Beach VA. The cohort
therefore does not depend on the covariates a query asks for. The binary target is
``num > 0`` (more than 50% diameter narrowing in a major vessel).

The coordinator chooses covariates by name from the fixed allow-list :data:`COVARIATES`; a
categorical column may also be asked for as an indicator ``"name=value"`` (e.g. ``"cp=4"``)
when the column is in :data:`CATEGORICAL`. Every allowed covariate has a declared clinical
range (:data:`COVARIATE_RANGES`), used to bound the L2 norm of one patient's row (the
sensitivity of noised regression statistics, see :func:`row_norm_bound`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from common.errors import ConfigError, DataError

__all__ = [
    "CATEGORICAL",
    "COVARIATES",
    "COVARIATE_RANGES",
    "INTERCEPT",
    "UCI_COLUMNS",
    "TabularData",
    "design_matrix",
    "load_tabular",
    "parse_columns",
    "row_norm_bound",
]

UCI_COLUMNS = (
    "age", "sex", "cp", "trestbps", "chol", "fbs", "restecg",
    "thalach", "exang", "oldpeak", "slope", "ca", "thal", "num",
)
"""Columns of a ``processed.*.data`` file, in order (``heart-disease.names``, section 7)."""

_DROPPED = ("slope", "ca", "thal")
_TARGET = "num"
INTERCEPT = "intercept"
"""Name of the constant column every design matrix starts with."""

COVARIATE_RANGES: dict[str, tuple[float, float]] = {
    "age": (0.0, 120.0),  # years
    "sex": (0.0, 1.0),  # 1 = male
    "cp": (1.0, 4.0),  # chest pain type
    "trestbps": (0.0, 300.0),  # resting blood pressure, mm Hg
    "chol": (0.0, 700.0),  # serum cholesterol, mg/dl (0 = not measured in Switzerland)
    "fbs": (0.0, 1.0),  # fasting blood sugar > 120 mg/dl
    "restecg": (0.0, 2.0),  # resting ECG result
    "thalach": (0.0, 250.0),  # maximum heart rate achieved
    "exang": (0.0, 1.0),  # exercise-induced angina
    "oldpeak": (-5.0, 10.0),  # ST depression induced by exercise
}
"""The allow-list: covariates a query may ask for, with the range used to bound a row."""

COVARIATES = tuple(COVARIATE_RANGES)
CATEGORICAL: dict[str, tuple[int, ...]] = {"cp": (1, 2, 3, 4), "restecg": (0, 1, 2)}
"""Columns that may be asked for as indicators ``"name=value"`` and their levels."""


@dataclass(frozen=True, eq=False)
class TabularData:
    """A node's filtered clinical rows (kept on the node; never sent).

    Attributes
    ----------
    values : numpy.ndarray
        float64 ``[n, len(COVARIATES)]``, columns in :data:`COVARIATES` order.
    target : numpy.ndarray
        float64 ``[n]`` in {0, 1}: ``num > 0``.
    """

    values: np.ndarray
    target: np.ndarray

    @property
    def num_patients(self) -> int:
        """Rows kept after filtering."""
        return int(self.target.shape[0])


def parse_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """Validate covariate names against the allow-list; return them as a tuple.

    Raises
    ------
    ConfigError
        For an empty list, a duplicate, or a name outside :data:`COVARIATES` (or an indicator
        of a level outside :data:`CATEGORICAL`). The safe reason names only the offending
        requested name, which came from the coordinator.
    """
    cols = tuple(str(c) for c in columns)
    if not cols:
        raise ConfigError("no covariates requested", safe_reason="no covariates requested")
    if len(set(cols)) != len(cols) or INTERCEPT in cols:
        raise ConfigError("duplicate covariates (or an explicit intercept) requested",
                          safe_reason="covariates must be distinct; the intercept is implicit")
    for col in cols:
        base, _, level = col.partition("=")
        ok = base in COVARIATE_RANGES if not level else (
            base in CATEGORICAL and level.lstrip("-").isdigit()
            and int(level) in CATEGORICAL[base]
        )
        if not ok:
            raise ConfigError(
                f"covariate {col!r} is not allowed",
                safe_reason=f"covariate {col!r} is not in this node's allow-list "
                f"({', '.join(COVARIATES)}; indicators like 'cp=4')",
            )
    return cols


def _parse_row(row: list[str]) -> list[float] | None:
    """One file row as floats in UCI order, or ``None`` when the row must be dropped."""
    if len(row) != len(UCI_COLUMNS):
        raise DataError(
            f"a row has {len(row)} fields, expected {len(UCI_COLUMNS)}",
            safe_reason="the node's clinical table is malformed (wrong number of fields)",
        )
    out: list[float] = []
    for name, field in zip(UCI_COLUMNS, row, strict=True):
        field = field.strip()
        if name in _DROPPED:
            continue
        if field == "?":
            return None
        try:
            value = float(field)
        except ValueError:
            raise DataError(
                f"non-numeric value in column {name}",
                safe_reason="the node's clinical table is malformed (non-numeric value)",
            ) from None
        if not math.isfinite(value):
            raise DataError(f"non-finite value in column {name}",
                            safe_reason="the node's clinical table has non-finite values")
        out.append(value)
    return out


@lru_cache(maxsize=8)
def _load_cached(path: str, mtime_ns: int, size: int) -> TabularData:
    del mtime_ns, size  # cache key only: a changed file is read again
    rows: list[list[float]] = []
    with open(path, newline="", encoding="ascii") as fh:
        for row in csv.reader(fh):
            if not row or all(not f.strip() for f in row):
                continue
            parsed = _parse_row(row)
            if parsed is not None:
                rows.append(parsed)
    if not rows:
        raise DataError("no complete rows in the clinical table",
                        safe_reason="the node's clinical table has no complete rows")
    arr = np.asarray(rows, dtype=np.float64)
    values, num = arr[:, :-1], arr[:, -1]
    if np.any(num < 0) or np.any(num != np.round(num)):
        raise DataError("num must be a non-negative integer",
                        safe_reason="the node's clinical table has an invalid diagnosis column")
    values.setflags(write=False)
    target = (num > 0).astype(np.float64)
    target.setflags(write=False)
    return TabularData(values=values, target=target)


def load_tabular(path: Path | str | None) -> TabularData:
    """Read and filter a node's clinical table (cached per file version).

    Parameters
    ----------
    path
        The node's ``tabular-path`` (a UCI ``processed.*.data`` file); ``None`` means the node
        serves no clinical data.

    Raises
    ------
    ConfigError
        When the node has no ``tabular-path`` or the file does not exist.
    DataError
        When the file is malformed or has no complete row.
    """
    if path is None:
        raise ConfigError("node has no tabular-path",
                          safe_reason="this node serves no clinical (tabular) data")
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"tabular-path {p} is not a file",
                          safe_reason="the node's clinical table is missing (see its tabular-path)")
    st = p.stat()
    return _load_cached(str(p.resolve()), st.st_mtime_ns, st.st_size)


def design_matrix(
    data: TabularData, columns: Sequence[str], *, clip: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(X, y)``: an intercept column then the requested covariates, and the target.

    Parameters
    ----------
    data
        The node's rows (:func:`load_tabular`).
    columns
        Allowed covariate names (:func:`parse_columns`), e.g. ``["age", "sex", "cp=4"]``.
    clip
        Clip every covariate into its declared range (:data:`COVARIATE_RANGES`), so that the
        row-norm bound of :func:`row_norm_bound` holds; used for noised releases.

    Returns
    -------
    tuple of numpy.ndarray
        ``X`` float64 ``[n, 1 + len(columns)]`` and ``y`` float64 ``[n]``.
    """
    cols = parse_columns(columns)
    index = {name: i for i, name in enumerate(COVARIATES)}
    out = [np.ones(data.num_patients)]
    for col in cols:
        base, _, level = col.partition("=")
        raw = data.values[:, index[base]]
        if level:
            out.append((raw == int(level)).astype(np.float64))
        else:
            lo, hi = COVARIATE_RANGES[base]
            out.append(np.clip(raw, lo, hi) if clip else raw.astype(np.float64))
    return np.column_stack(out), np.asarray(data.target, dtype=np.float64)


def row_norm_bound(columns: Sequence[str]) -> float:
    """Largest L2 norm of one (clipped) design-matrix row, intercept included."""
    total = 1.0
    for col in parse_columns(columns):
        base, _, level = col.partition("=")
        if level:
            total += 1.0
        else:
            lo, hi = COVARIATE_RANGES[base]
            total += max(lo * lo, hi * hi)
    return math.sqrt(total)
