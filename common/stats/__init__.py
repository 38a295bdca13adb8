"""Pooled statistical inference from node-side sufficient statistics (no Flower, no torch).

Every *node-side* function computes sums/counts over one hospital's held-out patients (what a
hospital releases: additive, so secure aggregation can replace plain addition); every
*coordinator-side* function takes the summed statistics (:func:`sum_stats` adds dicts of them)
and returns the estimate, which equals the named computation on the pooled patients.

Node side (per site) -> coordinator side -> what it equals on the pooled patients:

* ``metrics.confusion_counts`` -> ``metrics.classification_metrics`` / ``proportion_ci``:
  accuracy, sensitivity (recall), specificity, precision with Wilson or Clopper-Pearson CIs
  (statsmodels ``proportion_confint``); F1 with a delta-method CI on the logit scale.
* ``bins.class_histograms`` (pass 1) -> ``histogram.auc_from_histograms``: sklearn
  ``roc_auc_score`` on the binned scores (within ~1e-4 of it on raw scores, default edges).
* ``auc.node_placement_sums`` (pass 2) -> ``auc.delong_from_sums`` /
  ``paired_delong_from_sums``: DeLong (1988) variance and paired test on the binned scores.
* ``auc.local_delong`` (a site's own AUC and variance) -> ``meta.random_effects``.
* ``hypothesis.discordant_counts`` -> ``hypothesis.mcnemar_test``: statsmodels ``mcnemar``.
* ``calibration.calibration_bin_sums`` -> ``brier_from_sums`` (sklearn ``brier_score_loss``),
  ``expected_calibration_error``, ``reliability_diagram``.
* ``calibration.calibration_glm_stats`` -> ``calibration.fit_calibration``: statsmodels
  ``Logit(y ~ logit(score))`` (calibration intercept and slope).
* ``glm.logistic_node_stats`` -> ``glm.fit_logistic``: statsmodels ``Logit`` (coefficients,
  SEs, Wald CIs, LR test, AIC, BIC).
* pooled log-likelihoods -> ``selection.aic`` / ``bic``; CV scores and paired p-values ->
  ``selection.select_by_cv`` (Holm, statsmodels ``multipletests``).
* ``uncertainty.predictive_entropy`` + ``entropy_node_stats`` -> ``entropy_summary``: pooled
  mean, SD (ddof=1) and histogram of the per-patient entropies.
* ``conformal.nonconformity_histogram`` -> ``conformal.conformal_quantile``: split-conformal
  quantile, conservative by at most one bin width; ``coverage_counts`` -> ``coverage_summary``.
* per-site estimates and variances -> ``meta.random_effects``: statsmodels
  ``combine_effects(method_re="dl")`` (with tau^2 truncated at 0).
* planning (no data): ``power.n_for_auc_halfwidth``, ``n_for_auc_difference``,
  ``n_for_mcnemar``.

Pooling helpers (:mod:`common.stats.pooling`): :func:`sum_stats` adds node dicts key by key;
:func:`round_noisy_counts` post-processes DP-noised counts. Reports:
:func:`common.stats.histogram.compress_histograms` drops empty bins without changing AUC/ROC.

Node-side dicts use the plain keys documented on each function; the transport layer maps them
to wire keys in :mod:`common.messages`. Errors are :class:`common.errors.DataError` (bad or
inconsistent statistics) or :class:`common.errors.ConfigError` (bad parameters).
"""

from __future__ import annotations

from common.stats.estimate import Estimate
from common.stats.pooling import round_noisy_counts, sum_stats

__all__ = ["Estimate", "round_noisy_counts", "sum_stats"]
