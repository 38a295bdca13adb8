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
from common.stats.meta import (
    logit_auc_effects,
    logit_proportion_effects,
    random_effects,
    site_auc_effects,
)
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


def test_site_aucs_pooled_on_the_logit_scale_stay_inside_zero_one() -> None:
    # Prepare: three sites, one with an AUC near 1 whose raw-scale CI would pass 1
    aucs, variances, sizes = [0.9935, 0.9707, 0.9408], [4.0e-4, 6.0e-4, 9.5e-4], [74, 76, 74]
    # Execute
    est, var = logit_auc_effects(aucs, variances, sizes)
    meta = random_effects(est, var, site_names=["a", "b", "c"], scale="logit")
    doc = meta.as_dict()
    reference = combine_effects(est, var, method_re="dl")
    # Assert: the delta method, DerSimonian-Laird as statsmodels, bounds back inside (0, 1)
    a = np.array(aucs)
    np.testing.assert_allclose(est, np.log(a / (1 - a)))
    np.testing.assert_allclose(var, np.array(variances) / (a * (1 - a)) ** 2)
    assert meta.fixed_estimate == pytest.approx(reference.mean_effect_fe, rel=1e-10)
    assert meta.q == pytest.approx(reference.q, rel=1e-10)
    # Q < k - 1 here: DerSimonian-Laird truncates tau^2 at 0 (statsmodels 0.15 reports the
    # negative moment estimate, -0.51), so the random-effects mean is the fixed-effect one.
    assert reference.q < 2 and meta.tau2 == 0 and meta.estimate == meta.fixed_estimate
    assert 0 < doc["pooled"]["lower"] < doc["pooled"]["estimate"] < doc["pooled"]["upper"] < 1
    assert all(0 < s["lower"] <= s["upper"] < 1 for s in doc["sites"])
    assert doc["pooled"]["estimate"] == pytest.approx(expit(meta.estimate))


def test_a_perfect_site_auc_gets_a_half_patient_correction() -> None:
    est, var = logit_auc_effects([1.0, 0.5], [0.0, 0.01], [20, 20])
    edge = 1 / 40
    assert est[0] == pytest.approx(np.log((1 - edge) / edge)) and np.isfinite(var).all()
    assert var[0] > 0
    with pytest.raises(DataError):
        logit_auc_effects([1.2], [0.01], [10])
