"""Operating point from pooled histograms against sklearn's ROC curve on the pooled scores."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import expit
from sklearn.metrics import confusion_matrix, roc_curve

from common.errors import ConfigError, DataError
from common.stats.bins import class_histograms, fine_score_edges
from common.stats.operating_point import choose_operating_point, cut_counts


def _sites(seed: int, sizes: tuple[int, ...] = (90, 140, 70)) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for i, n in enumerate(sizes):
        y = rng.random(n) < 0.3 + 0.1 * i
        s = expit(rng.normal(1.6 * y - 0.4 * i, 1.0))
        out.append((s, y))
    return out


def _pooled_hists(sites: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    hs = [class_histograms(s, y) for s, y in sites]
    return np.sum([h[0] for h in hs], axis=0), np.sum([h[1] for h in hs], axis=0)


def _confusion(s: np.ndarray, y: np.ndarray, threshold: float) -> tuple[int, int, int, int]:
    tn, fp, fn, tp = confusion_matrix(y, (s >= threshold).astype(int), labels=[0, 1]).ravel()
    return int(tp), int(fp), int(tn), int(fn)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_youden_from_site_histograms_equals_sklearn_on_pooled_scores(seed: int) -> None:
    # Prepare
    sites = _sites(seed)
    pos, neg = _pooled_hists(sites)
    s = np.concatenate([x for x, _ in sites])
    y = np.concatenate([t for _, t in sites])
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    # Execute
    point = choose_operating_point(pos, neg, fine_score_edges())
    # Assert: the same validation counts (hence J) as sklearn's threshold, and the threshold
    # lies between the pooled score just below sklearn's threshold and that threshold.
    assert point.method == "youden"
    assert (point.tp, point.fp, point.tn, point.fn) == _confusion(s, y, float(thr[best]))
    assert point.youden_j == pytest.approx(tpr[best] - fpr[best], abs=1e-12)
    below = s[s < thr[best]]
    assert (below.max() if below.size else 0.0) < point.threshold <= thr[best]
    assert _confusion(s, y, point.threshold) == (point.tp, point.fp, point.tn, point.fn)


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_is_the_most_specific_threshold_reaching_it(target: float) -> None:
    # Prepare
    sites = _sites(7)
    pos, neg = _pooled_hists(sites)
    s = np.concatenate([x for x, _ in sites])
    y = np.concatenate([t for _, t in sites])
    fpr, tpr, thr = roc_curve(y, s, drop_intermediate=False)
    first = int(np.flatnonzero(tpr >= target)[0])  # thresholds decrease: the highest one
    # Execute
    point = choose_operating_point(pos, neg, fine_score_edges(), method="target-sensitivity",
                                   target_sensitivity=target)
    # Assert
    assert point.sensitivity >= target and point.target_sensitivity == target
    assert (point.tp, point.fp, point.tn, point.fn) == _confusion(s, y, float(thr[first]))
    assert point.specificity == pytest.approx(1 - fpr[first], abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.booleans()), min_size=4, max_size=60),
       st.integers(2, 40))
def test_youden_j_equals_sklearns_maximum_on_binned_scores(rows: list[tuple[float, bool]],
                                                           bins: int) -> None:
    # Prepare: scores snapped to coarse edges, so every bin holds one value (no resolution loss)
    s = np.array([r[0] for r in rows])
    y = np.array([r[1] for r in rows])
    if y.all() or not y.any():
        return
    edges = np.linspace(0, 1, bins + 1)
    snapped = edges[np.minimum(np.searchsorted(edges, s, side="right") - 1, bins - 1)]
    pos, neg = class_histograms(snapped, y, edges)
    fpr, tpr, _ = roc_curve(y, snapped, drop_intermediate=False)
    # Execute
    point = choose_operating_point(pos, neg, edges)
    # Assert
    assert point.youden_j == pytest.approx(float(np.max(tpr - fpr)), abs=1e-12)
    assert _confusion(snapped, y, point.threshold) == (point.tp, point.fp, point.tn, point.fn)


def test_threshold_sits_in_the_middle_of_the_empty_stretch() -> None:
    # Prepare: negatives in bin 1, positives in bin 8 of 10; every cut 2..8 separates them
    edges = np.linspace(0, 1, 11)
    pos = np.zeros(10, dtype=int)
    neg = np.zeros(10, dtype=int)
    neg[1], pos[8] = 5, 4
    # Execute
    point = choose_operating_point(pos, neg, edges)
    # Assert
    assert point.cut == 5 and point.threshold == pytest.approx(0.5)
    assert (point.sensitivity, point.specificity, point.youden_j) == (1.0, 1.0, 1.0)


def test_cut_counts_are_the_tail_sums() -> None:
    # Execute
    tp, fp = cut_counts([1, 0, 2], [3, 1, 0])
    # Assert
    assert tp.tolist() == [3, 2, 2, 0] and fp.tolist() == [4, 1, 0, 0]


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [({"method": "f1"}, ConfigError),
     ({"method": "target-sensitivity"}, ConfigError),
     ({"method": "target-sensitivity", "target_sensitivity": 1.2}, ConfigError),
     ({"method": "target-sensitivity", "target_sensitivity": 0.0}, ConfigError)],
)
def test_bad_rules_are_refused(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        choose_operating_point([1, 1], [1, 1], [0, 0.5, 1], **kwargs)  # type: ignore[arg-type]


def test_one_class_only_has_no_operating_point() -> None:
    with pytest.raises(DataError, match="positive and negative"):
        choose_operating_point([0, 0], [3, 1], [0, 0.5, 1])
