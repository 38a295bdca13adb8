"""Model selection: information criteria and cross-validated selection with Holm correction.

* :func:`aic`, :func:`bic` from a pooled log-likelihood (e.g. :func:`common.stats.glm.fit_logistic`
  or a summed per-patient log-likelihood released by nodes), the number of estimated
  parameters and the number of patients: ``AIC = -2 ll + 2 k`` (Akaike 1974),
  ``BIC = -2 ll + k ln n`` (Schwarz 1978). These equal statsmodels' ``aic``/``bic``.
* :func:`select_by_cv`: pick the candidate with the best pooled cross-validated score, test
  every other candidate against it with a paired test supplied by the caller (typically the
  paired DeLong test on pooled out-of-fold predictions,
  :func:`common.stats.auc.paired_delong_from_sums`), and adjust those p-values with Holm's
  step-down procedure (Holm, Scand. J. Statist. 1979) via
  :func:`statsmodels.stats.multitest.multipletests`. Candidates whose adjusted p-value is at or
  above ``alpha`` are statistically indistinguishable from the best.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from statsmodels.stats.multitest import multipletests

from common.errors import ConfigError, DataError
from common.stats._checks import alpha_level, count


def aic(loglik: float, n_params: int) -> float:
    """Akaike information criterion ``-2 loglik + 2 n_params``."""
    if not math.isfinite(loglik) or loglik > 0:
        raise DataError(f"log-likelihood must be finite and <= 0, got {loglik!r}",
                        safe_reason="invalid statistics input")
    return -2.0 * loglik + 2.0 * count(n_params, "n_params")


def bic(loglik: float, n_params: int, n: int) -> float:
    """Bayesian information criterion ``-2 loglik + n_params ln n``."""
    nn = count(n, "n")
    if nn < 1:
        raise DataError("n must be >= 1", safe_reason="invalid statistics input")
    return aic(loglik, 0) + count(n_params, "n_params") * math.log(nn)


@dataclass(frozen=True)
class SelectionResult:
    """Outcome of :func:`select_by_cv`."""

    best: str
    scores: dict[str, float]
    pvalues: dict[str, float]
    adjusted: dict[str, float]
    rejected: dict[str, bool]
    indistinguishable: list[str]
    alpha: float
    method: str = "holm"

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"best": self.best, "scores": self.scores, "pvalues": self.pvalues,
                "adjusted_pvalues": self.adjusted, "rejected": self.rejected,
                "indistinguishable": self.indistinguishable, "alpha": self.alpha,
                "method": self.method}


def holm_adjust(pvalues: Mapping[str, float], *, alpha: float = 0.05
                ) -> tuple[dict[str, float], dict[str, bool]]:
    """Holm-adjusted p-values and rejection decisions (``multipletests(method="holm")``)."""
    a = alpha_level(alpha)
    names = list(pvalues)
    if not names:
        return {}, {}
    p = np.array([float(pvalues[n]) for n in names])
    if np.any(~np.isfinite(p)) or np.any((p < 0) | (p > 1)):
        raise DataError("p-values must lie in [0, 1]", safe_reason="invalid statistics input")
    reject, adj, _, _ = multipletests(p, alpha=a, method="holm")
    return ({n: float(v) for n, v in zip(names, adj, strict=True)},
            {n: bool(r) for n, r in zip(names, reject, strict=True)})


def select_by_cv(
    scores: Mapping[str, float],
    paired_pvalue: Callable[[str, str], float] | Mapping[str, float],
    *,
    alpha: float = 0.05,
    higher_is_better: bool = True,
) -> SelectionResult:
    """Select the best candidate by pooled CV score, Holm-correcting paired tests against it.

    Parameters
    ----------
    scores
        Candidate name -> pooled cross-validated score (e.g. AUC of pooled out-of-fold
        predictions).
    paired_pvalue
        Either ``f(best, other) -> p`` (two-sided p-value of a paired test of the two
        candidates on the same patients), or a mapping ``other -> p`` already computed
        against the best.
    alpha
        Family-wise error rate.
    higher_is_better
        False for losses.

    Returns
    -------
    SelectionResult
        ``indistinguishable`` lists the best and every candidate not rejected after Holm.
    """
    a = alpha_level(alpha)
    if len(scores) < 1:
        raise ConfigError("no candidates to select from")
    vals = {n: float(v) for n, v in scores.items()}
    if any(not math.isfinite(v) for v in vals.values()):
        raise DataError("candidate scores must be finite", safe_reason="invalid statistics input")
    best = (max if higher_is_better else min)(vals, key=lambda n: vals[n])
    others = [n for n in vals if n != best]
    if isinstance(paired_pvalue, Mapping):
        missing = [n for n in others if n not in paired_pvalue]
        if missing:
            raise DataError(f"no p-value against the best ({best!r}) for {missing}",
                            safe_reason="invalid statistics input")
        raw = {n: float(paired_pvalue[n]) for n in others}
    else:
        raw = {n: float(paired_pvalue(best, n)) for n in others}
    adj, rej = holm_adjust(raw, alpha=a)
    indist = [best] + [n for n in others if not rej[n]]
    return SelectionResult(best, vals, raw, adj, rej, indist, a)
