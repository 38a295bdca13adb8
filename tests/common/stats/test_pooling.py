"""Pooling rules shared by every statistic: addition, shape checks, empty sites refused."""

from __future__ import annotations

import numpy as np
import pytest

from common.errors import ConfigError, DataError
from common.stats import sum_stats
from common.stats.auc import delong_from_sums, node_placement_sums
from common.stats.bins import class_histograms, fine_score_edges, uniform_edges, value_histogram
from common.stats.histogram import score_histograms
from common.stats.metrics import confusion_counts
from tests.common.stats.sites import scored_labels, split_indices


def test_sum_stats_adds_and_checks_shapes() -> None:
    out = sum_stats([{"n": 2, "h": np.array([1, 2])}, {"n": 3, "h": np.array([0, 5])}])
    assert out["n"] == 5.0
    np.testing.assert_array_equal(out["h"], [1, 7])
    with pytest.raises(DataError):
        sum_stats([])
    with pytest.raises(DataError):
        sum_stats([{"n": 1}, {"m": 1}])
    with pytest.raises(DataError):
        sum_stats([{"h": [1, 2]}, {"h": [1, 2, 3]}])


def test_empty_site_is_refused_with_a_clear_error() -> None:
    with pytest.raises(DataError, match="no held-out patients"):
        confusion_counts([], [])
    with pytest.raises(DataError, match="no held-out patients"):
        class_histograms([], [])


@pytest.mark.parametrize("seed", range(5))
def test_histograms_of_sites_add_up_to_pooled_histograms(seed: int) -> None:
    rng = np.random.default_rng(seed)
    s, y = scored_labels(rng, 500)
    parts = split_indices(rng, 500, 2 + seed)
    site = [class_histograms(s[i], y[i]) for i in parts]
    pooled = class_histograms(s, y)
    np.testing.assert_array_equal(sum(h[0] for h in site), pooled[0])
    np.testing.assert_array_equal(sum(h[1] for h in site), pooled[1])


def test_fine_edges_and_compatible_histogram_api() -> None:
    e = fine_score_edges()
    assert e[0] == 0.0 and e[-1] == 1.0 and np.all(np.diff(e) > 0)
    assert not e.flags.writeable
    s, y = [0.0, 0.25, 0.5, 1.0], [0, 1, 0, 1]
    a = score_histograms(s, y, edges=uniform_edges(4))
    b = score_histograms(s, y, bins=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(value_histogram([-1.0, 2.0], uniform_edges(2)), [1, 1])
    with pytest.raises(ConfigError):
        uniform_edges(0)
    with pytest.raises(ConfigError):
        class_histograms([0.1], [1], [0.0, 0.0, 1.0])


def test_named_models_api() -> None:
    rng = np.random.default_rng(1)
    s, y = scored_labels(rng, 200)
    edges = uniform_edges(50)
    h = class_histograms(s, y, edges)
    by_name = node_placement_sums({"m": s}, y, {"m": h}, edges=edges)
    by_pos = node_placement_sums([s], y, [h], edges=edges)
    assert delong_from_sums(by_name) == delong_from_sums(by_pos)


def test_round_noisy_counts_and_unchecked_delong() -> None:
    from common.stats import round_noisy_counts

    np.testing.assert_array_equal(round_noisy_counts([-0.7, 2.4, 2.6, 0.2]), [0, 2, 3, 0])
    with pytest.raises(DataError):
        round_noisy_counts([1.0, float("nan")])
    rng = np.random.default_rng(2)
    s, y = scored_labels(rng, 300)
    edges = uniform_edges(50)
    sums = node_placement_sums([s], y, [class_histograms(s, y, edges)], edges=edges)
    noisy = dict(sums, v01_sum=sums["v01_sum"] + 0.5)
    with pytest.raises(DataError):
        delong_from_sums(noisy)
    assert delong_from_sums(noisy, consistency_tol=None).auc == delong_from_sums(sums).auc


def test_compressed_histograms_keep_the_auc() -> None:
    from common.stats.histogram import auc_from_histograms, compress_histograms

    rng = np.random.default_rng(4)
    s, y = scored_labels(rng, 400)
    pos, neg = class_histograms(s, y)
    cp, cn = compress_histograms(pos, neg)
    assert cp.size <= 400 and cp.sum() == pos.sum() and cn.sum() == neg.sum()
    assert auc_from_histograms(cp, cn) == auc_from_histograms(pos, neg)


def test_node_releases_do_not_grow_with_patients() -> None:
    # A node statistic is a fixed-size summary: its size must not depend on the patient count.
    from common.stats.auc import local_delong
    from common.stats.calibration import calibration_bin_sums, calibration_glm_stats
    from common.stats.conformal import coverage_counts, nonconformity_histogram
    from common.stats.glm import logistic_node_stats
    from common.stats.hypothesis import discordant_counts
    from common.stats.uncertainty import entropy_node_stats

    def size(stats: object) -> int:
        if isinstance(stats, dict):
            return sum(size(v) for v in stats.values())
        if isinstance(stats, tuple):
            return sum(size(v) for v in stats)
        return int(np.asarray(stats).size)

    sizes = []
    for n in (50, 400):
        rng = np.random.default_rng(n)
        s, y = scored_labels(rng, n)
        s2 = np.clip(s + rng.normal(size=n) * 0.1, 0, 1)
        x = np.column_stack([np.ones(n), s])
        h = class_histograms(s, y)
        sizes.append([
            size(confusion_counts(s, y)), size(h),
            size(node_placement_sums([s, s2], y, [h, class_histograms(s2, y)])),
            size(discordant_counts(s, s2, y)), size(calibration_bin_sums(s, y)),
            size(calibration_glm_stats(s, y, [0.0, 1.0])),
            size(logistic_node_stats(x, y, [0.0, 0.0])),
            size(entropy_node_stats(s * 0.5)), size(nonconformity_histogram(s)),
            size(coverage_counts(s, y, 0.5)), size(tuple(local_delong(s, y))),
        ])
    assert sizes[0] == sizes[1]
