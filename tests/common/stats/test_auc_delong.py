"""Two-pass DeLong from node sums equals DeLong on the pooled binned scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import expit
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from common.errors import DataError
from common.stats import sum_stats
from common.stats.auc import (
    auc_ci,
    delong_from_sums,
    local_delong,
    node_placement_sums,
    paired_delong_from_sums,
)
from common.stats.bins import (
    bin_centres,
    bin_index,
    class_histograms,
    fine_score_edges,
    uniform_edges,
)
from common.stats.histogram import auc_from_histograms
from tests.common.stats.sites import scored_labels, split_indices


def direct_delong(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reference: DeLong on pooled scores via the full pairwise kernel.

    ``x`` (models, positives), ``y`` (models, negatives). Returns AUCs, covariance matrix.
    """
    psi = [(xa[:, None] > ya[None, :]) + 0.5 * (xa[:, None] == ya[None, :])
           for xa, ya in zip(x, y, strict=True)]
    v10 = np.array([p.mean(axis=1) for p in psi])
    v01 = np.array([p.mean(axis=0) for p in psi])
    auc = v10.mean(axis=1)
    cov = np.cov(v10) / x.shape[1] + np.cov(v01) / y.shape[1]
    return auc, np.atleast_2d(cov), v10


def two_pass(scores: list[np.ndarray], y: np.ndarray, parts: list[np.ndarray],
             edges: np.ndarray) -> dict[str, object]:
    """Run the protocol: pass 1 pooled histograms, pass 2 placement sums, summed."""
    hists = []
    for s in scores:
        site_h = [class_histograms(s[i], y[i], edges) for i in parts]
        hists.append((sum(h[0] for h in site_h), sum(h[1] for h in site_h)))
    site_sums = [node_placement_sums([s[i] for s in scores], y[i], hists, edges=edges)
                 for i in parts]
    return {"hists": hists, "sums": sum_stats(site_sums)}


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_delong_variance_matches_direct_on_binned_scores(seed: int) -> None:
    # Prepare
    rng = np.random.default_rng(seed)
    s, y = scored_labels(rng, 900)
    parts = split_indices(rng, s.size, 3 + seed % 2)
    edges = fine_score_edges()
    # Execute
    out = two_pass([s], y, parts, edges)
    res = delong_from_sums(out["sums"])  # type: ignore[arg-type]
    # Assert: direct DeLong on pooled bin numbers (the binned scores)
    b = bin_index(s, edges).astype(float)
    auc, cov, _ = direct_delong(b[None, y == 1], b[None, y == 0])
    assert res.auc == pytest.approx(auc[0], abs=1e-12)
    assert res.var == pytest.approx(cov[0, 0], abs=1e-10)
    # AUC agrees with the histogram AUC and with sklearn on the raw continuous scores
    pos, neg = out["hists"][0]  # type: ignore[index]
    assert res.auc == pytest.approx(auc_from_histograms(pos, neg), abs=1e-12)
    assert res.auc == pytest.approx(roc_auc_score(y, s), abs=1e-4)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paired_delong_matches_direct(seed: int) -> None:
    # Prepare: two correlated models on the same patients, coarse bins (many ties)
    rng = np.random.default_rng(10 + seed)
    n = 800
    y = (rng.random(n) < 0.35).astype(int)
    common_ = rng.normal(size=n)
    sa = 1 / (1 + np.exp(-(common_ + 1.3 * y + 0.6 * rng.normal(size=n))))
    sb = 1 / (1 + np.exp(-(common_ + 0.9 * y + 0.6 * rng.normal(size=n))))
    parts = split_indices(rng, n, 4)
    edges = uniform_edges(40)
    # Execute
    out = two_pass([sa, sb], y, parts, edges)
    res = paired_delong_from_sums(out["sums"])  # type: ignore[arg-type]
    # Assert
    ba, bb = (bin_index(v, edges).astype(float) for v in (sa, sb))
    x = np.vstack([ba[y == 1], bb[y == 1]])
    yy = np.vstack([ba[y == 0], bb[y == 0]])
    auc, cov, _ = direct_delong(x, yy)
    se = math.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    z = (auc[0] - auc[1]) / se
    assert (res.auc_a, res.auc_b) == pytest.approx(tuple(auc), abs=1e-12)
    assert res.se == pytest.approx(se, abs=1e-10)
    assert res.z == pytest.approx(z, rel=1e-8)
    assert res.p == pytest.approx(2 * norm.sf(abs(z)), rel=1e-8)
    single = delong_from_sums(out["sums"], model=1)  # type: ignore[arg-type]
    assert single.var == pytest.approx(cov[1, 1], abs=1e-10)


@pytest.mark.parametrize("where", ["edges", "centres"])
def test_auc_exact_when_scores_on_fine_bin_edges_or_centres(where: str) -> None:
    rng = np.random.default_rng(3)
    edges = fine_score_edges()
    points = edges[:-1] if where == "edges" else bin_centres(edges)
    y = rng.integers(0, 2, size=2000)
    s = points[np.clip(rng.integers(0, 800, size=2000) * 12 + 2000 * y, 0, points.size - 1)]
    pos, neg = class_histograms(s, y)
    assert auc_from_histograms(pos, neg) == pytest.approx(roc_auc_score(y, s), abs=1e-13)


@pytest.mark.parametrize("sd", [1.0, 1.5, 4.0])
@pytest.mark.parametrize("n", [1000, 5000])
def test_default_bins_auc_within_1e4_of_sklearn_on_raw_scores(sd: float, n: int) -> None:
    for seed in range(3):
        rng = np.random.default_rng(seed)
        s, y = scored_labels(rng, n, sd=sd, shift=1.0 + sd / 2)
        pos, neg = class_histograms(s, y)
        assert abs(auc_from_histograms(pos, neg) - roc_auc_score(y, s)) <= 1e-4


def test_identical_models_give_p_one_and_ci_is_clipped() -> None:
    rng = np.random.default_rng(0)
    s, y = scored_labels(rng, 300)
    out = two_pass([s, s], y, [np.arange(150), np.arange(150, 300)], uniform_edges(100))
    res = paired_delong_from_sums(out["sums"])  # type: ignore[arg-type]
    assert res.diff == 0.0 and res.p == 1.0
    est = auc_ci(0.99, 0.0004)
    assert est.upper == 1.0 and est.lower == pytest.approx(0.99 - norm.ppf(0.975) * 0.02)


def test_placement_sums_reject_bad_input() -> None:
    edges = uniform_edges(10)
    good = (np.ones(10), np.ones(10))
    with pytest.raises(DataError):  # histograms with the wrong number of bins
        node_placement_sums([[0.1, 0.9]], [0, 1], [(np.ones(5), np.ones(5))], edges=edges)
    with pytest.raises(DataError):  # models scoring different patients
        node_placement_sums([[0.1, 0.9], [0.2]], [0, 1], [good, good], edges=edges)
    with pytest.raises(DataError):  # empty pooled class
        node_placement_sums([[0.1, 0.9]], [0, 1], [(np.zeros(10), np.ones(10))], edges=edges)
    with pytest.raises(DataError):  # mapping names differ
        node_placement_sums({"a": [0.1, 0.9]}, [0, 1], {"b": good}, edges=edges)
    wrong = (np.eye(10)[0] * 5, np.eye(10)[9] * 5)  # not the pooled histograms of these data
    sums = node_placement_sums([[0.1, 0.9, 0.3, 0.7]], [0, 1, 0, 1], [wrong], edges=edges)
    with pytest.raises(DataError):  # the sums are inconsistent with one set of pooled hists
        delong_from_sums(sums)
    with pytest.raises(DataError):
        delong_from_sums({"n_pos": 1, "n_neg": 5, "v10_sum": [0.5], "v10_cross": [[0.25]],
                          "v01_sum": [2.5], "v01_cross": [[1.25]]})
    with pytest.raises(DataError):
        paired_delong_from_sums({k: v for k, v in sums.items() if k != "v01_cross"})


def test_scores_outside_the_edges_are_refused_naming_the_range() -> None:
    # Prepare: perfectly ranked scores on a logit-like scale (the review's example)
    raw, y = [1.5, 2, 3, 4, 5, 6], [0, 0, 0, 1, 1, 1]
    # Execute / Assert: refused (clipping would tie them all in the last bin: AUC 0.5)
    with pytest.raises(DataError, match=r"outside \[0, 1\].*sigmoid") as info:
        local_delong(raw, y)
    assert "[0, 1]" in info.value.safe_reason
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        class_histograms(raw, y)
    with pytest.raises(DataError, match=r"outside \[0, 1\]"):
        node_placement_sums([[-0.1, 0.5]], [0, 1], [(np.ones(10), np.ones(10))],
                            edges=uniform_edges(10))
    with pytest.raises(DataError, match=r"outside \[0.2, 0.8\]"):  # custom edges: their range
        class_histograms([0.1, 0.5], [0, 1], uniform_edges(6, 0.2, 0.8))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_scores_are_refused(bad: float) -> None:
    with pytest.raises(DataError, match="NaN or infinite"):
        local_delong([0.1, 0.2, bad, 0.8, 0.9, 0.7], [0, 0, 0, 1, 1, 1])


def test_logits_through_the_sigmoid_give_the_sklearn_auc() -> None:
    # Prepare: the review's example, and over-confident logits on a wide scale
    raw, y = np.array([1.5, 2, 3, 4, 5, 6]), np.array([0, 0, 0, 1, 1, 1])
    rng = np.random.default_rng(7)
    y2 = rng.integers(0, 2, size=3000)
    logits = rng.normal(size=3000) * 3 + 2.0 * y2
    # Execute
    small = local_delong(expit(raw), y)
    big = local_delong(expit(logits), y2)
    edge = local_delong([0.0, 0.0, 1.0, 1.0, 0.5, 0.5], [0, 0, 1, 1, 0, 1])
    # Assert: the same AUC as sklearn on the untransformed scores (binning error only)
    assert small.auc == pytest.approx(roc_auc_score(y, raw), abs=1e-12)
    assert small.auc == 1.0 and small.var == 0.0
    assert big.auc == pytest.approx(roc_auc_score(y2, logits), abs=1e-4)
    # 0 and 1 themselves are accepted (the last bin is closed on the right)
    assert edge.auc == pytest.approx(roc_auc_score([0, 0, 1, 1, 0, 1], [0, 0, 1, 1, .5, .5]),
                                     abs=1e-12)


def test_auc_ci_of_an_undefined_auc_is_undefined() -> None:
    # Execute
    undefined = auc_ci(math.nan, 0.01, n=40)
    no_var = auc_ci(0.8, math.nan, n=40)
    # Assert: NaN bounds (None in the report), never the whole range (0, 1)
    assert all(math.isnan(v) for v in (undefined.value, undefined.lower, undefined.upper,
                                        undefined.se))
    assert undefined.as_dict() == {"value": None, "lower": None, "upper": None, "se": None,
                                   "n": 40, "method": "delong"}
    assert no_var.value == 0.8 and math.isnan(no_var.lower) and math.isnan(no_var.upper)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        auc_ci(1.2, 0.01)
    with pytest.raises(DataError, match="variance"):
        auc_ci(0.8, -0.01)
    with pytest.raises(DataError, match="variance"):
        auc_ci(0.8, math.inf)
