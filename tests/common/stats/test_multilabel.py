"""Multi-label: per-label DeLong AUCs, Holm tests and macro AUC equal the pooled computation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm
from sklearn.metrics import roc_auc_score
from statsmodels.stats.multitest import multipletests

from common.errors import ConfigError, DataError
from common.stats._records import merge_all
from common.stats.bins import bin_index, uniform_edges
from common.stats.multilabel import (
    LabelHistograms,
    LabelPlacementSums,
    label_aucs,
    label_histograms,
    label_placement_sums,
)
from tests.common.stats.sites import split_indices
from tests.common.stats.test_auc_delong import direct_delong


def findings(rng: np.random.Generator, n: int, strengths: list[float]) -> tuple[np.ndarray,
                                                                               np.ndarray]:
    """Correlated binary labels (a shared severity) and scores of the given strengths."""
    severity = rng.normal(size=n)
    y = (severity[:, None] + rng.normal(size=(n, len(strengths))) > 0.3).astype(int)
    logits = np.array(strengths)[None, :] * (y - 0.5) + 0.7 * severity[:, None] \
        + rng.normal(size=y.shape)
    return 1 / (1 + np.exp(-logits)), y


def federated(s: np.ndarray, y: np.ndarray, parts: list[np.ndarray],
              edges: np.ndarray | None = None) -> tuple[LabelHistograms, LabelPlacementSums]:
    hists = merge_all([label_histograms(s[i], y[i], edges=edges) for i in parts])
    sums = merge_all([label_placement_sums(s[i], y[i], hists, edges=edges) for i in parts])
    return hists, sums


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_per_label_and_macro_auc_match_sklearn(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    s, y = findings(rng, 1200, [2.0, 1.0, 0.5, 0.0])
    # Execute
    hists, sums = federated(s, y, split_indices(rng, y.shape[0], 3))
    res = label_aucs(hists, sums)
    # Assert: within bin resolution of sklearn on the raw pooled scores
    np.testing.assert_allclose(hists.aucs(), [e.value for e in res.per_label], atol=1e-12)
    np.testing.assert_allclose([e.value for e in res.per_label],
                               roc_auc_score(y, s, average=None), atol=1e-4)
    assert res.macro.value == pytest.approx(roc_auc_score(y, s, average="macro"), abs=1e-4)


def test_variances_p_values_and_holm_match_a_direct_computation() -> None:
    # Prepare: coarse bins (ties); one informative label, one useless
    rng = np.random.default_rng(3)
    s, y = findings(rng, 600, [2.0, 0.0, 1.0])
    s[:, 1] = rng.random(600)  # scores unrelated to label 1
    edges = uniform_edges(25)
    # Execute
    res = label_aucs(*federated(s, y, split_indices(rng, y.shape[0], 4), edges), alpha=0.05)
    # Assert: DeLong on the pooled binned scores (pairwise kernel), z-test, statsmodels Holm
    p_ref = []
    for lab in range(3):
        b = bin_index(s[:, lab], edges).astype(float)
        auc, cov, _ = direct_delong(b[None, y[:, lab] == 1], b[None, y[:, lab] == 0])
        assert res.per_label[lab].value == pytest.approx(auc[0], abs=1e-12)
        assert res.per_label[lab].se ** 2 == pytest.approx(cov[0, 0], rel=1e-9)
        assert res.covariance[lab][lab] == pytest.approx(cov[0, 0], rel=1e-9)
        p_ref.append(2 * norm.sf(abs(auc[0] - 0.5) / np.sqrt(cov[0, 0])))
    np.testing.assert_allclose(res.p_values, p_ref, rtol=1e-8)
    reject, p_holm, _, _ = multipletests(p_ref, alpha=0.05, method="holm")
    np.testing.assert_allclose(res.p_holm, p_holm, rtol=1e-8)
    assert list(reject) == [True, False, True]


def test_macro_variance_matches_the_jackknife_for_correlated_labels() -> None:
    # Prepare: labels share a severity, so their AUCs covary
    rng = np.random.default_rng(8)
    s, y = findings(rng, 400, [1.5, 1.0, 1.0])
    # Execute
    res = label_aucs(*federated(s, y, split_indices(rng, y.shape[0], 3)))
    # Assert: jackknife of sklearn's per-label AUCs on the pooled patients
    loo = np.array([roc_auc_score(np.delete(y, i, axis=0), np.delete(s, i, axis=0),
                                  average=None) for i in range(y.shape[0])])
    centred = loo - loo.mean(axis=0)
    jack = (y.shape[0] - 1) / y.shape[0] * centred.T @ centred
    np.testing.assert_allclose(res.covariance, jack, rtol=0.05)
    assert res.macro.se ** 2 == pytest.approx(jack.sum() / 9, rel=0.03)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 5))
def test_merged_site_statistics_equal_one_site_holding_the_union(seed: int, k: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    s, y = findings(rng, 80, [1.0, 0.5])
    y[:4] = [[0, 0], [0, 0], [1, 1], [1, 1]]  # two of each class per label, whatever the draw
    edges = uniform_edges(40)
    parts = split_indices(rng, y.shape[0], k) if k > 1 else [np.arange(y.shape[0])]
    # Execute
    hists, sums = federated(s, y, parts, edges)
    union_h = label_histograms(s, y, edges=edges)
    union_s = label_placement_sums(s, y, union_h, edges=edges)
    # Assert
    np.testing.assert_array_equal(hists.positive, union_h.positive)
    np.testing.assert_array_equal(hists.negative, union_h.negative)
    for name in ("n_pos", "n_neg", "v10_sum", "v10_sq", "v01_sum", "v01_sq", "cross"):
        np.testing.assert_allclose(getattr(sums, name), getattr(union_s, name),
                                   rtol=1e-12, atol=1e-12)


def test_perfect_separation_gives_an_undefined_p_value_outside_the_holm_family() -> None:
    # Prepare: label 0 perfectly separated (DeLong variance 0), label 1 informative
    rng = np.random.default_rng(2)
    y = np.column_stack([np.repeat([0, 1], 50), rng.integers(0, 2, 100)])
    s = np.column_stack([np.where(y[:, 0] == 1, 0.9, 0.1),
                         np.clip(0.5 + 0.3 * (y[:, 1] - 0.5) + 0.2 * rng.normal(size=100),
                                 0, 1)])
    edges = uniform_edges(50)
    # Execute
    res = label_aucs(*federated(s, y, [np.arange(50), np.arange(50, 100)], edges))
    # Assert
    assert res.per_label[0].value == 1.0 and res.per_label[0].se == 0.0
    assert np.isnan(res.p_values[0]) and np.isnan(res.p_holm[0])
    assert res.p_holm[1] == pytest.approx(res.p_values[1], rel=1e-12)  # a family of one
    assert res.as_dict()["p_values"][0] is None


def test_bad_input_is_refused() -> None:
    edges = uniform_edges(10)
    s = np.full((6, 2), 0.5)
    y = np.array([[0, 1]] * 6)  # label 0 has no positives, label 1 no negatives
    with pytest.raises(DataError, match="two positives"):
        label_placement_sums(s, y, label_histograms(s, y, edges=edges), edges=edges)
    with pytest.raises(DataError, match="binary"):
        label_histograms(s, y * 2, edges=edges)
    with pytest.raises(DataError, match="shape"):
        label_histograms(s, y[:, :1], edges=edges)
    with pytest.raises(DataError, match="no held-out"):
        label_histograms(np.empty((0, 2)), np.empty((0, 2)), edges=edges)
    with pytest.raises(DataError, match="label/bin layout"):
        label_histograms(s, y, edges=edges) + label_histograms(s, y, edges=uniform_edges(5))
    rng = np.random.default_rng(0)
    s2, y2 = findings(rng, 40, [1.0, 1.0])
    h = label_histograms(s2, y2, edges=edges)
    with pytest.raises(ConfigError):
        label_aucs(h, label_placement_sums(s2, y2, h, edges=edges), method="mean")
    with pytest.raises(DataError, match="labels"):
        label_placement_sums(s2[:, :1], y2[:, :1], h, edges=edges)
