"""The multi-task workflow's pooled presence statistics equal sklearn's on the pooled images.

Three hospitals' patient-weighted presence histograms (:func:`client.queries.multi_task.
presence_histograms`), summed as the coordinator sums them, give the AUC, accuracy,
sensitivity and specificity of :func:`server.paradigms.multi_task.presence_summary`; sklearn
computes the same on the pooled per-image scores with each image weighted 1 / (its patient's
image count). Scores sit at bin centres, so binning loses nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, recall_score, roc_auc_score

from client.queries.multi_task import presence_histograms
from server.paradigms.multi_task import presence_summary, youden_threshold

BINS = 1000


def _hospital(rng: np.random.Generator, patients: int) -> tuple[np.ndarray, ...]:
    counts = rng.integers(1, 6, size=patients)
    index = np.repeat(np.arange(patients), counts)
    present = rng.random(len(index)) < 0.6
    raw = np.clip(rng.normal(0.35 + 0.3 * present, 0.2), 0, 0.9999)
    scores = (np.floor(raw * BINS) + 0.5) / BINS  # bin centres
    return scores, present.astype(int), index


def test_pooled_presence_statistics_equal_sklearn_on_the_pooled_images() -> None:
    # Prepare: three hospitals, patients with 1-5 images each
    rng = np.random.default_rng(7)
    sites = [_hospital(rng, n) for n in (12, 20, 9)]
    # Execute: each node's histograms, summed at the coordinator
    pooled = sum(presence_histograms(s, y, i, BINS) for s, y, i in sites)
    got = presence_summary(pooled)
    # Assert: sklearn on the pooled images, weighted 1 / images of the patient
    scores = np.concatenate([s for s, _, _ in sites])
    labels = np.concatenate([y for _, y, _ in sites])
    weights = np.concatenate([1.0 / np.bincount(i)[i] for _, _, i in sites])
    called = (scores >= 0.5).astype(int)
    assert got["auc"] == pytest.approx(roc_auc_score(labels, scores, sample_weight=weights))
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, called, sample_weight=weights))
    assert got["sensitivity"] == pytest.approx(recall_score(labels, called, sample_weight=weights))
    assert got["specificity"] == pytest.approx(
        recall_score(1 - labels, 1 - called, sample_weight=weights))
    assert got["lesion_weight"] + got["no_lesion_weight"] == pytest.approx(12 + 20 + 9)


def test_one_patient_moves_the_histograms_by_at_most_one_in_l2() -> None:
    rng = np.random.default_rng(3)
    scores, present, index = _hospital(rng, 10)
    full = presence_histograms(scores, present, index, BINS)
    keep = index != 4
    without = presence_histograms(scores[keep], present[keep], index[keep], BINS)
    assert np.linalg.norm(full - without) <= 1.0 + 1e-12
    assert (full - without).sum() == pytest.approx(1.0)


def test_a_class_without_images_gives_no_auc() -> None:
    hist = np.zeros((2, BINS))
    hist[0, 700] = 3.0
    got = presence_summary(hist)
    assert got["auc"] is None and got["specificity"] is None and got["sensitivity"] == 1.0


def test_the_operating_threshold_is_youdens_on_the_weighted_images_and_figures_follow_it() -> None:
    from sklearn.metrics import roc_curve

    # Prepare: a badly calibrated head (every score below 0.5), patients with 1-5 images
    rng = np.random.default_rng(11)
    sites = [_hospital(rng, n) for n in (30, 25)]
    sites = [(s * 0.45, y, i) for s, y, i in sites]
    pooled = sum(presence_histograms(s, y, i, BINS) for s, y, i in sites)
    scores = np.concatenate([s for s, _, _ in sites])
    labels = np.concatenate([y for _, y, _ in sites])
    weights = np.concatenate([1.0 / np.bincount(i)[i] for _, _, i in sites])
    # Execute
    t = youden_threshold(pooled)
    got = presence_summary(pooled, t)
    # Assert: t attains sklearn's best weighted J, and the figures are sklearn's at t
    fpr, tpr, _ = roc_curve(labels, scores, sample_weight=weights)
    called = (scores >= t).astype(int)
    sens = recall_score(labels, called, sample_weight=weights)
    spec = recall_score(1 - labels, 1 - called, sample_weight=weights)
    assert sens + spec - 1 == pytest.approx(np.max(tpr - fpr), abs=1e-9)
    assert t < 0.5 and got["sensitivity"] == pytest.approx(sens)
    assert got["specificity"] == pytest.approx(spec)
    assert got["accuracy"] == pytest.approx(accuracy_score(labels, called, sample_weight=weights))
    assert presence_summary(pooled)["specificity"] == pytest.approx(1.0)  # at 0.5: all "none"
