"""Segmentation: per-patient Dice and HD95 at the node, pooled means with t intervals.

Node side
---------
For each held-out patient, :func:`case_metrics` compares a predicted and a true binary mask
(2-D or 3-D, the same shape) and gives

* the Dice coefficient ``2 |P & T| / (|P| + |T|)`` (Dice, Ecology 1945; 26:297-302);
* the 95th-percentile Hausdorff distance (HD95) in physical units: the surface of a mask is
  its voxels with a face-neighbour outside it (``mask & ~binary_erosion(mask)``; voxels on the
  array's border count as surface), distances from each surface voxel of one mask to the
  nearest surface voxel of the other come from a Euclidean distance transform with the voxel
  spacing (``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``), and
  ``HD95 = max(P95(d(P -> T)), P95(d(T -> P)))`` with linearly interpolated percentiles
  (Huttenlocher et al., IEEE TPAMI 1993; 15:850-863 for the partial Hausdorff distance; the
  same definition as ``monai.metrics.compute_hausdorff_distance(percentile=95)``).

Empty masks (explicit conventions):

* both empty (nothing to find, nothing found): Dice = 1, HD95 undefined;
* exactly one empty (a missed or an invented structure): Dice = 0, HD95 undefined (no
  surface to measure to: infinite).

Undefined HD95s are counted (``n_empty_both``, ``n_empty_one``) and left out of the HD95
mean, never replaced by a number. :func:`segmentation_node_stats` releases only the sums of
:class:`SegmentationSums`; the per-patient values never leave the node.

Coordinator side
----------------
:func:`segmentation_summary` turns merged sums into the pooled mean Dice and mean HD95 with
t intervals ``mean +- t_{n-1} s / sqrt(n)`` (Student 1908; s from the sum of squares,
ddof = 1; Dice clipped to [0, 1], HD95 at 0), equal to the same computation on the pooled
per-patient values; :func:`per_site_summaries` does the same per site. The t interval for a
mean of bounded, skewed per-patient values leans on the central limit theorem.

Spacing: in millimetres, one value per array axis, e.g. DICOM (0028,0030) Pixel Spacing
(row spacing, column spacing) for a 2-D slice, with the slice spacing, e.g. (0018,0088)
Spacing Between Slices, first for a (slices, rows, columns) volume.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt
from scipy.ndimage import binary_erosion, distance_transform_edt
from scipy.stats import t

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level
from common.stats._records import Record, get_count, get_float, same
from common.stats.estimate import Estimate

__all__ = [
    "CaseMetrics",
    "SegmentationSummary",
    "SegmentationSums",
    "case_metrics",
    "dice_coefficient",
    "hausdorff_distance",
    "per_site_summaries",
    "segmentation_node_stats",
    "segmentation_summary",
]

_SAFE = "invalid statistics input"


def _masks(pred: npt.ArrayLike, true: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred), np.asarray(true)
    if p.shape != g.shape or p.ndim not in (2, 3):
        raise DataError(f"masks must be 2-D or 3-D of the same shape, got {p.shape} and "
                        f"{g.shape}", safe_reason=_SAFE)
    for m in (p, g):
        if m.dtype != bool and not np.all(np.isin(m, (0, 1))):
            raise DataError("masks must be binary (0/1 or bool)", safe_reason=_SAFE)
    return p.astype(bool), g.astype(bool)


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(v) for v in spacing)
    if len(sp) != ndim or not all(math.isfinite(v) and v > 0 for v in sp):
        raise ConfigError(f"spacing must hold {ndim} finite values > 0 (mm per axis), "
                          f"got {spacing!r}")
    return sp


def dice_coefficient(pred: npt.ArrayLike, true: npt.ArrayLike) -> float:
    """Dice of two binary masks; 1 when both are empty (module conventions)."""
    p, g = _masks(pred, true)
    total = int(p.sum()) + int(g.sum())
    return 1.0 if total == 0 else 2.0 * int(np.count_nonzero(p & g)) / total


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~binary_erosion(mask)


def hausdorff_distance(
    pred: npt.ArrayLike,
    true: npt.ArrayLike,
    *,
    spacing: Sequence[float],
    percentile: float = 95.0,
) -> float:
    """Symmetric percentile Hausdorff distance between the masks' surfaces, in spacing units.

    Parameters
    ----------
    pred, true
        Binary masks of the same 2-D or 3-D shape.
    spacing
        Voxel size per axis (mm), e.g. from (0028,0030) Pixel Spacing.
    percentile
        95 for HD95; 100 gives the classical Hausdorff distance.

    Returns
    -------
    float
        ``max(P(d(pred -> true)), P(d(true -> pred)))``; NaN when either mask is empty.
    """
    p, g = _masks(pred, true)
    sp = _spacing(spacing, p.ndim)
    if not 0.0 <= float(percentile) <= 100.0:
        raise ConfigError(f"percentile must lie in [0, 100], got {percentile!r}")
    if not p.any() or not g.any():
        return math.nan
    sp_, sg = _surface(p), _surface(g)
    to_true = distance_transform_edt(~sg, sampling=sp)[sp_]
    to_pred = distance_transform_edt(~sp_, sampling=sp)[sg]
    return float(max(np.percentile(to_true, percentile), np.percentile(to_pred, percentile)))


@dataclass(frozen=True)
class CaseMetrics:
    """One patient's Dice and HD95 (kept at the node).

    ``empty`` is ``"none"``, ``"both"`` or ``"one"`` (which masks are empty); ``hd95`` is NaN
    unless ``empty == "none"``.
    """

    dice: float
    hd95: float
    empty: str = "none"


def case_metrics(
    pred: npt.ArrayLike, true: npt.ArrayLike, *, spacing: Sequence[float]
) -> CaseMetrics:
    """Node-side Dice and HD95 of one patient's predicted and true masks."""
    p, g = _masks(pred, true)
    n_empty = int(not p.any()) + int(not g.any())
    empty = ("none", "one", "both")[n_empty]
    return CaseMetrics(dice=dice_coefficient(p, g),
                       hd95=hausdorff_distance(p, g, spacing=spacing), empty=empty)


@dataclass(frozen=True)
class SegmentationSums:
    """Node-side sums of per-patient Dice and HD95 (add over nodes with ``+``).

    Attributes
    ----------
    n : int
        Patients.
    sum_dice, sum_dice_sq : float
        Sums of Dice and Dice^2 over all patients.
    n_hd95, sum_hd95, sum_hd95_sq : int, float, float
        Patients with a defined HD95 and the sums of HD95 and HD95^2 over them.
    n_empty_both, n_empty_one : int
        Patients whose masks were both empty / exactly one empty (HD95 undefined).

    Notes
    -----
    With one patient the sums are that patient's Dice and HD95, and an ``n_empty_*`` count
    of 1 tells whether that patient had the structure (e.g. a lesion): the node's release
    rules (minimum counts, small cells suppressed) apply.
    """

    n: int
    sum_dice: float
    sum_dice_sq: float
    n_hd95: int
    sum_hd95: float
    sum_hd95_sq: float
    n_empty_both: int
    n_empty_one: int

    _COUNTS: ClassVar[tuple[str, ...]] = ("n", "n_hd95", "n_empty_both", "n_empty_one")
    _SUMS: ClassVar[tuple[str, ...]] = ("sum_dice", "sum_dice_sq", "sum_hd95", "sum_hd95_sq")

    def __post_init__(self) -> None:
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        for name in self._COUNTS:
            object.__setattr__(self, name, get_count(record, name))
        for name in self._SUMS:
            object.__setattr__(self, name, get_float(record, name))
        if self.n_hd95 + self.n_empty_both + self.n_empty_one != self.n:
            raise DataError("n_hd95 + n_empty_both + n_empty_one must equal n",
                            safe_reason=_SAFE)

    @property
    def n_hd95_undefined(self) -> int:
        """Patients without a defined HD95 (an empty mask)."""
        return self.n_empty_both + self.n_empty_one

    def merge(self, other: SegmentationSums) -> SegmentationSums:
        """Sums over the union of both sets of patients."""
        same("type", type(self), type(other))
        return SegmentationSums(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                                   for f in fields(self)})

    __add__ = merge

    def to_record(self) -> Record:
        """Flat record: the four counts (int) and four sums (float)."""
        out: Record = {name: int(getattr(self, name)) for name in self._COUNTS}
        out.update({name: float(getattr(self, name)) for name in self._SUMS})
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> SegmentationSums:
        """Inverse of :meth:`to_record`."""
        return cls(**{name: get_count(record, name) for name in cls._COUNTS},
                   **{name: get_float(record, name) for name in cls._SUMS})


def segmentation_node_stats(cases: Iterable[CaseMetrics]) -> SegmentationSums:
    """Node-side sums over its held-out patients' :class:`CaseMetrics`."""
    items = list(cases)
    if not items:
        raise DataError("no held-out patients at this site",
                        safe_reason="no held-out patients at this site")
    dice = np.array([c.dice for c in items])
    defined = np.array([c.hd95 for c in items if c.empty == "none"])
    if not np.all(np.isfinite(dice)) or not np.all(np.isfinite(defined)):
        raise DataError("Dice and defined HD95 values must be finite", safe_reason=_SAFE)
    return SegmentationSums(
        n=len(items), sum_dice=float(dice.sum()), sum_dice_sq=float(dice @ dice),
        n_hd95=int(defined.size), sum_hd95=float(defined.sum()),
        sum_hd95_sq=float(defined @ defined),
        n_empty_both=sum(c.empty == "both" for c in items),
        n_empty_one=sum(c.empty == "one" for c in items))


@dataclass(frozen=True)
class SegmentationSummary:
    """Pooled (or one site's) mean Dice and mean HD95 with t intervals.

    ``hd95`` is over the ``hd95.n`` patients with a defined HD95; ``n_empty_both`` and
    ``n_empty_one`` say how many were left out and why.
    """

    n: int
    dice: Estimate
    hd95: Estimate
    n_empty_both: int
    n_empty_one: int

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready dict."""
        return {"n": self.n, "dice": self.dice.as_dict(), "hd95": self.hd95.as_dict(),
                "n_empty_both": self.n_empty_both, "n_empty_one": self.n_empty_one}


def _mean_ci(total: float, total_sq: float, n: int, alpha: float, lo: float,
             hi: float) -> Estimate:
    if n == 0:
        return Estimate(math.nan, math.nan, math.nan, math.nan, 0, "t")
    mean = total / n
    if n < 2:
        return Estimate(mean, math.nan, math.nan, math.nan, n, "t")
    se = math.sqrt(max(total_sq - n * mean * mean, 0.0) / (n - 1) / n)
    q = float(t.ppf(1 - alpha / 2, n - 1))
    return Estimate(mean, max(lo, mean - q * se), min(hi, mean + q * se), se, n, "t")


def segmentation_summary(stats: SegmentationSums, *, alpha: float = 0.05) -> SegmentationSummary:
    """Coordinator: mean Dice and mean HD95 with t intervals from merged sums.

    NaN estimates where no patient (or no defined HD95) is counted; NaN intervals with one.
    """
    a = alpha_level(alpha)
    return SegmentationSummary(
        n=stats.n,
        dice=_mean_ci(stats.sum_dice, stats.sum_dice_sq, stats.n, a, 0.0, 1.0),
        hd95=_mean_ci(stats.sum_hd95, stats.sum_hd95_sq, stats.n_hd95, a, 0.0, math.inf),
        n_empty_both=stats.n_empty_both, n_empty_one=stats.n_empty_one)


def per_site_summaries(
    site_stats: Mapping[str, SegmentationSums], *, alpha: float = 0.05
) -> dict[str, SegmentationSummary]:
    """Each site's mean Dice and HD95 (site name -> summary), e.g. for a forest plot."""
    return {site: segmentation_summary(s, alpha=alpha) for site, s in site_stats.items()}
