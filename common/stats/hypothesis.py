"""McNemar's test for two classifiers on the same patients, from summed discordant counts.

Node side: :func:`discordant_counts` counts, among the node's held-out patients, ``b`` = model A
correct and model B wrong, ``c`` = A wrong and B correct (and the concordant ``a``, ``d`` for
completeness). The counts add over nodes; :func:`mcnemar_test` on the sums equals McNemar's
test on the pooled paired table.

Statistics (McNemar, Psychometrika 1947; Edwards 1948 for the continuity correction):

* exact: two-sided binomial test of ``b`` successes in ``b + c`` trials at p = 1/2, i.e.
  ``min(1, 2 * P(Bin(b + c, 1/2) <= min(b, c)))``; the statistic reported is ``min(b, c)``.
* chi-square: ``(|b - c| - 1)^2 / (b + c)`` with the continuity correction, ``(b - c)^2 / (b + c)``
  without, referred to chi-square with 1 degree of freedom.

These match :func:`statsmodels.stats.contingency_tables.mcnemar` (which the tests check);
written out because the inputs here are two counts rather than a table.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
from scipy.stats import binom, chi2

from common.errors import DataError
from common.stats._checks import as_labels, as_scores, count

DISCORDANT_KEYS = ("both_correct", "b", "c", "both_wrong")


class McNemarResult(NamedTuple):
    """McNemar test result. ``statistic`` is min(b, c) for the exact test, chi-square otherwise."""

    statistic: float
    pvalue: float
    b: int
    c: int
    method: str


def discordant_counts(
    scores_a: npt.ArrayLike,
    scores_b: npt.ArrayLike,
    labels: npt.ArrayLike,
    *,
    threshold: float = 0.5,
) -> dict[str, int]:
    """Node-side paired correctness table of two models at ``score >= threshold``.

    Returns
    -------
    dict
        ``both_correct``, ``b`` (A right, B wrong), ``c`` (A wrong, B right), ``both_wrong``.
    """
    sa, sb = as_scores(scores_a, "scores_a"), as_scores(scores_b, "scores_b")
    if sa.size != sb.size:
        raise DataError("both models must score the same patients",
                        safe_reason="invalid statistics input")
    y = as_labels(labels, sa.size)
    ok_a = (sa >= threshold) == y
    ok_b = (sb >= threshold) == y
    return {
        "both_correct": int(np.sum(ok_a & ok_b)),
        "b": int(np.sum(ok_a & ~ok_b)),
        "c": int(np.sum(~ok_a & ok_b)),
        "both_wrong": int(np.sum(~ok_a & ~ok_b)),
    }


def mcnemar_test(b: Any, c: Any, *, exact: bool = True, correction: bool = True) -> McNemarResult:
    """McNemar's test from pooled discordant counts ``b`` and ``c``.

    Parameters
    ----------
    b, c
        Summed discordant counts (A right/B wrong and A wrong/B right).
    exact
        Binomial test if True, else chi-square.
    correction
        Continuity correction for the chi-square version (ignored when ``exact``).

    Returns
    -------
    McNemarResult
        With ``b + c == 0`` the models never disagree: p-value 1.
    """
    bb, cc = count(b, "b"), count(c, "c")
    n = bb + cc
    if exact:
        k = min(bb, cc)
        p = 1.0 if n == 0 else min(1.0, 2.0 * float(binom.cdf(k, n, 0.5)))
        return McNemarResult(float(k), p, bb, cc, "exact")
    if n == 0:
        return McNemarResult(0.0, 1.0, bb, cc, "chi2-corrected" if correction else "chi2")
    # As statsmodels: (|b - c| - 1)^2 / (b + c) with the correction (also when b == c).
    diff = abs(bb - cc) - (1.0 if correction else 0.0)
    stat = diff * diff / n
    return McNemarResult(stat, float(chi2.sf(stat, 1)), bb, cc,
                         "chi2-corrected" if correction else "chi2")
