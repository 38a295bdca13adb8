"""Segmentation: node-side Dice/HD95 against direct computations, pooled means against the union."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from flwr.app import MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter
from scipy.spatial.distance import cdist, directed_hausdorff
from statsmodels.stats.weightstats import DescrStatsW

from common.errors import ConfigError, DataError
from common.stats._records import merge_all
from common.stats.segmentation import (
    CaseMetrics,
    SegmentationSums,
    case_metrics,
    dice_coefficient,
    hausdorff_distance,
    per_site_summaries,
    segmentation_node_stats,
    segmentation_summary,
)

CASES = [((24, 24), (0.7, 1.3)), ((17, 9), (1.0, 1.0)), ((10, 14, 12), (2.5, 0.8, 0.8))]


def blob(rng: np.random.Generator, shape: tuple[int, ...], fraction: float = 0.4) -> np.ndarray:
    """A smooth random binary mask (a few blobs) covering about ``fraction`` of the array."""
    field = gaussian_filter(rng.normal(size=shape), 2.0)
    return field > np.quantile(field, 1.0 - fraction)


def surface_points(mask: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Reference: physical coordinates of voxels with a face-neighbour outside the mask
    (outside the array counts as outside), by explicit neighbour shifts."""
    padded = np.pad(mask, 1)
    inner = tuple(slice(1, -1) for _ in mask.shape)
    outside_neighbour = np.zeros_like(mask)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            outside_neighbour |= ~np.roll(padded, step, axis=axis)[inner]
    return np.argwhere(mask & outside_neighbour) * np.asarray(spacing)


@pytest.mark.parametrize(("shape", "spacing"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_hd95_matches_brute_force_surface_distances(
    shape: tuple[int, ...], spacing: tuple[float, ...], seed: int
) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    pred, true = blob(rng, shape), blob(rng, shape, fraction=0.5)
    # Execute
    hd95 = hausdorff_distance(pred, true, spacing=spacing)
    hd = hausdorff_distance(pred, true, spacing=spacing, percentile=100)
    # Assert: all pairwise distances between the two surfaces
    sp, st_ = surface_points(pred, spacing), surface_points(true, spacing)
    d = cdist(sp, st_)
    ref95 = max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))
    assert hd95 == pytest.approx(ref95, rel=1e-12)
    ref100 = max(directed_hausdorff(sp, st_)[0], directed_hausdorff(st_, sp)[0])
    assert hd == pytest.approx(ref100, rel=1e-12)


@pytest.mark.parametrize(("shape", "spacing"), CASES)
def test_hd95_matches_monai(shape: tuple[int, ...], spacing: tuple[float, ...]) -> None:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    # Prepare
    rng = np.random.default_rng(7)
    pred, true = blob(rng, shape), blob(rng, shape, fraction=0.3)
    # Execute
    ours = hausdorff_distance(pred, true, spacing=spacing)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        ref = metrics.compute_hausdorff_distance(
            torch.tensor(pred)[None, None].float(), torch.tensor(true)[None, None].float(),
            percentile=95, spacing=list(spacing))
    # Assert (MONAI computes in float32)
    assert ours == pytest.approx(float(ref), rel=1e-5)


def test_dice_and_the_empty_mask_conventions() -> None:
    # Prepare
    rng = np.random.default_rng(3)
    pred, true = blob(rng, (20, 20)), blob(rng, (20, 20))
    empty = np.zeros((20, 20), dtype=bool)
    # Execute
    both_empty = case_metrics(empty, empty, spacing=(1.0, 1.0))
    missed = case_metrics(empty, true, spacing=(1.0, 1.0))
    invented = case_metrics(pred, empty, spacing=(1.0, 1.0))
    normal = case_metrics(pred.astype(int), true.astype(int), spacing=(1.0, 1.0))
    # Assert
    ref = 2 * np.logical_and(pred, true).sum() / (pred.sum() + true.sum())
    assert dice_coefficient(pred, true) == pytest.approx(ref, abs=1e-15)
    assert normal.dice == pytest.approx(ref, abs=1e-15) and normal.empty == "none"
    assert (both_empty.dice, both_empty.empty) == (1.0, "both") and math.isnan(both_empty.hd95)
    for case in (missed, invented):
        assert (case.dice, case.empty) == (0.0, "one") and math.isnan(case.hd95)
    assert dice_coefficient(true, true) == 1.0
    assert hausdorff_distance(true, true, spacing=(1.0, 1.0)) == 0.0


def _cases(rng: np.random.Generator, n: int) -> list[CaseMetrics]:
    out = []
    for i in range(n):
        pred = blob(rng, (16, 16)) if i % 9 else np.zeros((16, 16), dtype=bool)
        true = blob(rng, (16, 16)) if i % 13 else np.zeros((16, 16), dtype=bool)
        out.append(case_metrics(pred, true, spacing=(0.8, 0.8)))
    return out


def test_pooled_means_match_t_intervals_on_the_pooled_patients() -> None:
    # Prepare: 60 patients at three sites, some with empty masks
    rng = np.random.default_rng(5)
    cases = _cases(rng, 60)
    sites = {"a": cases[:15], "b": cases[15:40], "c": cases[40:]}
    # Execute
    site_stats = {name: segmentation_node_stats(c) for name, c in sites.items()}
    res = segmentation_summary(merge_all(site_stats.values()), alpha=0.1)
    per_site = per_site_summaries(site_stats, alpha=0.1)
    # Assert
    dice = np.array([c.dice for c in cases])
    hd = np.array([c.hd95 for c in cases if c.empty == "none"])
    assert res.n == 60 and res.hd95.n == hd.size
    assert res.n_empty_both == sum(c.empty == "both" for c in cases) == 1
    assert res.n_empty_one == sum(c.empty == "one" for c in cases) == 10
    assert res.dice.value == pytest.approx(dice.mean(), rel=1e-12)
    assert (res.dice.lower, res.dice.upper) == pytest.approx(
        DescrStatsW(dice).tconfint_mean(alpha=0.1), rel=1e-10)
    assert res.hd95.value == pytest.approx(hd.mean(), rel=1e-12)
    assert (res.hd95.lower, res.hd95.upper) == pytest.approx(
        DescrStatsW(hd).tconfint_mean(alpha=0.1), rel=1e-10)
    for name, c in sites.items():
        assert per_site[name].dice.value == pytest.approx(np.mean([x.dice for x in c]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.one_of(st.none(), st.floats(0, 80)),
                          st.booleans()), min_size=1, max_size=30),
       st.lists(st.integers(0, 2), min_size=30, max_size=30))
def test_merging_sites_equals_the_union(
    values: list[tuple[float, float | None, bool]], site_of: list[int]
) -> None:
    # Prepare: per-patient values (None: an empty mask, both or one)
    cases = [CaseMetrics(d, math.nan, "both" if flag else "one") if h is None
             else CaseMetrics(d, h) for d, h, flag in values]
    site = site_of[: len(cases)]
    # Execute
    merged = merge_all(segmentation_node_stats([c for c, s in zip(cases, site, strict=True)
                                                if s == k]) for k in set(site))
    union = segmentation_node_stats(cases)
    # Assert
    for name in SegmentationSums._COUNTS:
        assert getattr(merged, name) == getattr(union, name)
    for name in SegmentationSums._SUMS:
        assert getattr(merged, name) == pytest.approx(getattr(union, name), rel=1e-9, abs=1e-9)
    back = SegmentationSums.from_record(dict(MetricRecord(merged.to_record())))
    assert back == merged


def test_bad_input_is_refused() -> None:
    mask = np.ones((4, 4), dtype=bool)
    with pytest.raises(DataError, match="same shape"):
        dice_coefficient(mask, np.ones((4, 5)))
    with pytest.raises(DataError, match="binary"):
        dice_coefficient(mask * 2, mask)
    with pytest.raises(ConfigError, match="spacing"):
        hausdorff_distance(mask, mask, spacing=(1.0,))
    with pytest.raises(ConfigError, match="spacing"):
        hausdorff_distance(mask, mask, spacing=(1.0, 0.0))
    with pytest.raises(DataError, match="no held-out"):
        segmentation_node_stats([])
    with pytest.raises(DataError, match="must equal n"):
        SegmentationSums(n=3, sum_dice=1.0, sum_dice_sq=1.0, n_hd95=1, sum_hd95=2.0,
                         sum_hd95_sq=4.0, n_empty_both=0, n_empty_one=0)
    one = segmentation_summary(segmentation_node_stats([CaseMetrics(0.5, 3.0)]))
    assert one.dice.value == 0.5 and math.isnan(one.dice.lower)
