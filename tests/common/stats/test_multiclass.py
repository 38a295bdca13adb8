"""Multi-class: pooled confusion metrics and one-vs-rest AUCs equal the pooled-data computation."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from flwr.app import MetricRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)
from statsmodels.stats.proportion import proportion_confint

from common.errors import DataError
from common.stats._records import merge_all
from common.stats.bins import bin_index, fine_score_edges, uniform_edges
from common.stats.multiclass import (
    ConfusionMatrix,
    confusion_matrix_counts,
    confusion_metrics,
    ovr_auc,
    ovr_histograms,
    ovr_placement_sums,
)
from common.stats.multilabel import LabelHistograms, LabelPlacementSums
from tests.common.stats.sites import split_indices
from tests.common.stats.test_auc_delong import direct_delong


def softmax_data(
    rng: np.random.Generator, n: int, k: int, *, signal: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Class labels and softmax probabilities that favour the true class."""
    y = rng.integers(0, k, size=n)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return p / p.sum(axis=1, keepdims=True), y


def federated_ovr(p: np.ndarray, y: np.ndarray, parts: list[np.ndarray],
                  edges: np.ndarray | None = None) -> tuple[LabelHistograms, LabelPlacementSums]:
    """Both passes, each site releasing its own statistics, merged at the coordinator."""
    hists = merge_all([ovr_histograms(p[i], y[i], edges=edges) for i in parts])
    sums = merge_all([ovr_placement_sums(p[i], y[i], hists, edges=edges) for i in parts])
    return hists, sums


@pytest.mark.parametrize(("seed", "k"), [(0, 3), (1, 4), (2, 5)])
def test_ovr_auc_matches_sklearn_on_pooled_scores(seed: int, k: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    p, y = softmax_data(rng, 1500, k)
    parts = split_indices(rng, y.size, 3)
    # Execute
    hists, sums = federated_ovr(p, y, parts)
    res = ovr_auc(hists, sums)
    # Assert: raw scores within bin resolution; binned scores exactly
    per_class = roc_auc_score(y, p, multi_class="ovr", average=None)
    np.testing.assert_allclose([e.value for e in res.per_label], per_class, atol=1e-4)
    assert res.macro.value == pytest.approx(
        roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-4)
    binned = [roc_auc_score(y == c, bin_index(p[:, c], fine_score_edges())) for c in range(k)]
    np.testing.assert_allclose([e.value for e in res.per_label], binned, atol=1e-12)
    assert res.macro.value == pytest.approx(np.mean(binned), abs=1e-12)
    assert all(e.lower < e.value < e.upper for e in (*res.per_label, res.macro))


def test_per_class_variance_is_delong_on_binned_scores() -> None:
    # Prepare: coarse bins, many ties
    rng = np.random.default_rng(4)
    p, y = softmax_data(rng, 700, 3, signal=0.8)
    edges = uniform_edges(30)
    # Execute
    res = ovr_auc(*federated_ovr(p, y, split_indices(rng, y.size, 4), edges))
    # Assert: each class's variance is DeLong's on its binned one-vs-rest scores, and the
    # diagonal of the label covariance matrix equals it
    for c in range(3):
        b = bin_index(p[:, c], edges).astype(float)
        auc, cov, _ = direct_delong(b[None, y == c], b[None, y != c])
        assert res.per_label[c].value == pytest.approx(auc[0], abs=1e-12)
        assert res.per_label[c].se ** 2 == pytest.approx(cov[0, 0], rel=1e-9)
        assert res.covariance[c][c] == pytest.approx(cov[0, 0], rel=1e-9)


def test_macro_auc_variance_matches_the_jackknife_on_pooled_scores() -> None:
    # Prepare
    rng = np.random.default_rng(5)
    p, y = softmax_data(rng, 400, 3)
    # Execute
    res = ovr_auc(*federated_ovr(p, y, split_indices(rng, y.size, 3)))
    bound = ovr_auc(*federated_ovr(p, y, split_indices(rng, y.size, 2)), method="bound")
    # Assert: the jackknife covariance of sklearn's per-class AUCs on the pooled patients
    # (Quenouille-Tukey), an independent estimate of the same first-order covariance
    loo = np.array([roc_auc_score(np.delete(y, i), np.delete(p, i, axis=0),
                                  multi_class="ovr", average=None) for i in range(y.size)])
    centred = loo - loo.mean(axis=0)
    jack = (y.size - 1) / y.size * centred.T @ centred
    np.testing.assert_allclose(res.covariance, jack, rtol=0.05)
    assert res.macro.se ** 2 == pytest.approx(jack.sum() / 9, rel=0.03)
    assert res.macro.method == "delong-covariance"
    # The Cauchy-Schwarz bound is wider
    assert bound.macro.method == "delong-bound" and bound.macro.se >= res.macro.se
    assert bound.macro.value == pytest.approx(res.macro.value, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_confusion_metrics_match_sklearn_and_statsmodels(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    k = 3 + seed
    p, y = softmax_data(rng, 800, k, signal=1.5)
    pred = p.argmax(axis=1)
    parts = split_indices(rng, y.size, 4)
    # Execute
    cm = merge_all([confusion_matrix_counts(y[i], pred[i], n_classes=k) for i in parts])
    res = confusion_metrics(cm, alpha=0.1)
    # Assert
    np.testing.assert_array_equal(res.confusion, confusion_matrix(y, pred, labels=range(k)))
    assert res.accuracy.value == pytest.approx(accuracy_score(y, pred), abs=1e-15)
    lo, hi = proportion_confint(int((y == pred).sum()), y.size, alpha=0.1, method="wilson")
    assert (res.accuracy.lower, res.accuracy.upper) == pytest.approx((lo, hi), abs=1e-14)
    recall = recall_score(y, pred, average=None, labels=range(k))
    precision = precision_score(y, pred, average=None, labels=range(k), zero_division=np.nan)
    np.testing.assert_allclose([e.value for e in res.sensitivity], recall, atol=1e-15)
    np.testing.assert_allclose([e.value for e in res.precision], precision, atol=1e-15)
    for c in range(k):
        tp = int(np.sum((y == c) & (pred == c)))
        for est, total in ((res.sensitivity[c], np.sum(y == c)),
                           (res.precision[c], np.sum(pred == c))):
            ref = proportion_confint(tp, int(total), alpha=0.1, method="wilson")
            assert (est.lower, est.upper) == pytest.approx(ref, abs=1e-14)
    n_k = np.bincount(y, minlength=k)
    ref_se = np.sqrt(np.sum(recall * (1 - recall) / n_k)) / k
    assert res.balanced_accuracy.value == pytest.approx(balanced_accuracy_score(y, pred),
                                                        abs=1e-15)
    assert res.balanced_accuracy.se == pytest.approx(ref_se, rel=1e-12)
    half = res.balanced_accuracy.upper - res.balanced_accuracy.value
    assert half == pytest.approx(1.6448536269514722 * ref_se, rel=1e-9)


def test_balanced_accuracy_leaves_out_absent_classes_as_sklearn() -> None:
    # Prepare: class 2 is predicted but never true
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    pred = np.array([0, 2, 0, 1, 1, 0, 1, 0])
    # Execute
    res = confusion_metrics(confusion_matrix_counts(y, pred, n_classes=3))
    # Assert
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = balanced_accuracy_score(y, pred)
    assert res.balanced_accuracy.value == pytest.approx(ref, abs=1e-15)
    assert np.isnan(res.sensitivity[2].value) and res.precision[2].value == 0.0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=2, max_size=60),
       st.integers(1, 5), st.randoms(use_true_random=False))
def test_merging_site_matrices_equals_the_union(
    pairs: list[tuple[int, int]], sites: int, rnd: object
) -> None:
    # Prepare: the patients dealt to sites (some sites may get none and release nothing)
    y, pred = (np.array(v) for v in zip(*pairs, strict=True))
    site_of = np.array([rnd.randrange(sites) for _ in pairs])  # type: ignore[attr-defined]
    # Execute
    merged = merge_all(confusion_matrix_counts(y[site_of == s], pred[site_of == s],
                                               n_classes=4)
                       for s in range(sites) if np.any(site_of == s))
    # Assert
    np.testing.assert_array_equal(merged.counts, confusion_matrix(y, pred, labels=range(4)))
    again = ConfusionMatrix.from_record(MetricRecord(merged.to_record()))
    np.testing.assert_array_equal(again.counts, merged.counts)


def test_records_round_trip_through_a_flower_metric_record() -> None:
    # Prepare
    rng = np.random.default_rng(6)
    p, y = softmax_data(rng, 60, 3)
    edges = uniform_edges(20)
    hists = ovr_histograms(p, y, edges=edges)
    sums = ovr_placement_sums(p, y, hists, edges=edges)
    # Execute: what a node would put in a MetricRecord, and what the coordinator reads back
    h2 = LabelHistograms.from_record(dict(MetricRecord(hists.to_record())))
    s2 = LabelPlacementSums.from_record(dict(MetricRecord(sums.to_record())))
    # Assert
    np.testing.assert_array_equal(h2.positive, hists.positive)
    np.testing.assert_array_equal(h2.negative, hists.negative)
    np.testing.assert_array_equal(s2.cross, sums.cross)
    assert ovr_auc(h2, s2).macro == ovr_auc(hists, sums).macro


def test_bad_input_is_refused() -> None:
    edges = uniform_edges(10)
    p = np.full((4, 3), 1 / 3)
    with pytest.raises(DataError, match="class indices"):
        confusion_matrix_counts([0, 3], [0, 1], n_classes=3)
    with pytest.raises(DataError, match="different number of classes"):
        ConfusionMatrix(counts=np.eye(3)) + ConfusionMatrix(counts=np.eye(2))
    with pytest.raises(DataError, match="non-negative integer"):
        ConfusionMatrix(counts=[[1.5, 0], [0, 1]])
    with pytest.raises(DataError, match="outside"):
        ovr_histograms(p * 4, [0, 1, 2, 0], edges=edges)
    with pytest.raises(DataError, match="two positives"):  # class 2 has one patient
        ovr_placement_sums(p, [0, 1, 2, 0], ovr_histograms(p, [0, 1, 2, 0], edges=edges),
                           edges=edges)
    rng = np.random.default_rng(0)
    q, y = softmax_data(rng, 50, 3)
    h_other = ovr_histograms(*softmax_data(rng, 50, 3), edges=edges)
    h = ovr_histograms(q, y, edges=edges)
    with pytest.raises(DataError, match="inconsistent|do not come from"):
        ovr_auc(h, ovr_placement_sums(q, y, h_other, edges=edges))
