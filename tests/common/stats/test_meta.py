"""DerSimonian-Laird meta-analysis equals statsmodels combine_effects(method_re="dl")."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit
from statsmodels.stats.meta_analysis import combine_effects

from common.errors import DataError
from common.stats import sum_stats
from common.stats.auc import delong_from_sums, node_placement_sums
from common.stats.bins import class_histograms
from common.stats.meta import logit_proportion_effects, random_effects, site_auc_effects
from tests.common.stats.sites import scored_labels


def _compare(y: np.ndarray, v: np.ndarray) -> None:
    res = random_effects(y, v)
    ref = combine_effects(y, v, method_re="dl")
    frame = ref.summary_frame()
    assert res.estimate == pytest.approx(ref.mean_effect_re, abs=1e-12)
    assert res.se == pytest.approx(ref.sd_eff_w_re, abs=1e-12)
    assert res.fixed_estimate == pytest.approx(ref.mean_effect_fe, abs=1e-12)
    assert res.tau2 == pytest.approx(ref.tau2, abs=1e-12)
    assert res.i2 == pytest.approx(ref.i2, abs=1e-12)
    assert res.q == pytest.approx(ref.q, abs=1e-10)
    lo, hi = frame.loc["random effect", ["ci_low", "ci_upp"]]
    assert (res.lower, res.upper) == pytest.approx((lo, hi), abs=1e-12)
    np.testing.assert_allclose(res.weights, ref.weights_rel_re, atol=1e-12)


def test_meta_of_site_aucs_with_delong_variances() -> None:
    # Prepare: four sites with different discrimination (heterogeneous AUCs)
    rng = np.random.default_rng(0)
    pairs = []
    for shift in (0.6, 1.0, 1.5, 2.2):
        s, y = scored_labels(rng, 400, shift=shift)
        pos, neg = class_histograms(s, y)
        sums = sum_stats([node_placement_sums([s], y, [(pos, neg)])])
        pairs.append(tuple(delong_from_sums(sums)))
    y_, v_ = site_auc_effects(pairs)
    # Execute / Assert
    _compare(y_, v_)
    assert random_effects(y_, v_).tau2 > 0


def test_meta_of_sensitivity_on_logit_scale_and_homogeneous_case() -> None:
    tp, pos = [40, 55, 12, 80], [50, 70, 20, 100]
    y, v = logit_proportion_effects(tp, pos)
    _compare(y, v)
    np.testing.assert_allclose(v, [1 / 40 + 1 / 10, 1 / 55 + 1 / 15, 1 / 12 + 1 / 8,
                                   1 / 80 + 1 / 20])
    d = random_effects(y, v, scale="logit", site_names=["a", "b", "c", "d"]).as_dict()
    assert d["sites"][0]["estimate"] == pytest.approx(0.8)
    assert d["pooled"]["estimate"] == pytest.approx(expit(random_effects(y, v).estimate))


def test_tau2_truncated_at_zero_when_q_below_df() -> None:
    # statsmodels 0.15 leaves tau^2 = (Q - df) / c negative here; DerSimonian-Laird (and
    # R metafor) truncate at 0, so the random-effects result equals the fixed-effect one.
    y, v = np.array([0.8, 0.81, 0.79]), np.array([0.01, 0.02, 0.03])
    ref = combine_effects(y, v, method_re="dl")
    assert ref.q < 2 and ref.tau2 < 0
    res = random_effects(y, v)
    assert res.tau2 == 0.0 and res.i2 == 0.0
    assert res.q == pytest.approx(ref.q, abs=1e-12)
    assert res.estimate == pytest.approx(ref.mean_effect_fe, abs=1e-12)
    assert res.se == pytest.approx(ref.sd_eff_w_fe, abs=1e-12)


def test_meta_validation() -> None:
    with pytest.raises(DataError):
        random_effects([0.7], [0.01])
    with pytest.raises(DataError):
        random_effects([0.7, 0.8], [0.01, 0.0])
    with pytest.raises(DataError):
        random_effects([0.7, 0.8], [0.01])
    with pytest.raises(DataError):
        logit_proportion_effects([5], [0])
    y, v = logit_proportion_effects([0, 10], [10, 10])  # Haldane-Anscombe correction
    assert np.all(np.isfinite(y)) and v[0] == pytest.approx(1 / 0.5 + 1 / 10.5)
