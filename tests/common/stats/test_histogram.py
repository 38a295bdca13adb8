"""Histogram AUC equals scikit-learn's AUC on the pooled scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.stats.histogram import auc_from_histograms, score_histograms


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auc_exact_when_scores_sit_on_bin_edges(seed: int) -> None:
    # Prepare: scores on the bin grid, so binning loses nothing (ties stay ties)
    rng = np.random.default_rng(seed)
    bins = 50
    labels = rng.integers(0, 2, size=400)
    scores = np.clip(rng.integers(0, bins, size=400) + 3 * labels, 0, bins - 1) / bins
    # Execute
    pos, neg = score_histograms(scores, labels, bins=bins)
    # Assert
    assert auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)


def test_auc_close_with_default_bins_and_merges_across_sites() -> None:
    rng = np.random.default_rng(7)
    sites = []
    for shift in (0.5, 1.0, 1.5):
        y = rng.integers(0, 2, size=300)
        s = 1 / (1 + np.exp(-(rng.normal(size=300) + shift * y)))
        sites.append((s, y))
    hists = [score_histograms(s, y) for s, y in sites]
    pooled_pos = sum(h[0] for h in hists)
    pooled_neg = sum(h[1] for h in hists)
    all_s = np.concatenate([s for s, _ in sites])
    all_y = np.concatenate([y for _, y in sites])
    assert auc_from_histograms(pooled_pos, pooled_neg) == pytest.approx(
        roc_auc_score(all_y, all_s), abs=1e-3
    )


def test_auc_nan_for_single_class_and_edges() -> None:
    pos, neg = score_histograms([0.1, 0.2], [1, 1], bins=10)
    assert np.isnan(auc_from_histograms(pos, neg))
    pos, neg = score_histograms([1.0, 0.0], [1, 0], bins=10)
    assert pos[-1] == 1 and neg[0] == 1
    assert auc_from_histograms(pos, neg) == 1.0
