"""Sample-size planning for AUC estimation, AUC comparison and McNemar's test.

* :func:`hanley_mcneil_variance`: variance of the empirical AUC with ``n_pos`` diseased and
  ``n_neg`` non-diseased patients (Hanley & McNeil, Radiology 1982; 143:29-36, eq. 2)::

      Var(A) = [A(1 - A) + (n_pos - 1)(Q1 - A^2) + (n_neg - 1)(Q2 - A^2)] / (n_pos n_neg),
      Q1 = A / (2 - A),  Q2 = 2 A^2 / (1 + A).

* :func:`n_for_auc_halfwidth`: the smallest study with ``z_{1-alpha/2} sqrt(Var(A)) <= w``.
* :func:`n_for_auc_difference`: patients to detect ``AUC_1 != AUC_2`` (two-sided) with the
  test the project runs, DeLong's test (DeLong, DeLong & Clarke-Pearson, Biometrics 1988;
  44:837-845; :func:`common.stats.auc.paired_delong_from_sums`, or the two sites' own
  :func:`~common.stats.auc.local_delong` variances added for independent samples). It is a
  Wald test, ``z = (A_1 - A_2) / sqrt(V)``, whose variance ``V`` is *estimated at the observed
  AUCs*; under the alternative its expectation is::

      V1 = Var(A_1) + Var(A_2) - 2 r sqrt(Var(A_1) Var(A_2))     (Hanley & McNeil, Radiology
                                                                 1983; 148:839-843)

  with each ``Var(A)`` the Hanley-McNeil (1982) variance at that alternative AUC. The test
  rejects with probability ``Phi(|AUC_1 - AUC_2| / sqrt(V1) - z_{1-alpha/2})`` (plus the
  negligible opposite tail), so the criterion is::

      (z_{1-alpha/2} + z_{1-beta}) sqrt(V1) <= |AUC_1 - AUC_2|

  and it is symmetric in the two AUCs. (The criterion of Obuchowski & McClish, Stat Med 1997;
  16:1529-1542, puts a null variance ``V0`` with both AUCs equal in the first term; that fits a
  test that uses the null variance, not DeLong's, and with ``V0`` at the larger AUC it
  promised 0.80 where DeLong's test reached 0.75.) ``r`` is the correlation between the two
  AUC estimates: ``r = 0`` for two independent samples (each model/reader on its own
  patients, the count returned is *per sample*), ``r > 0`` for two models on the same
  patients (paired design; Hanley & McNeil 1983 tabulate r from the score correlations).
* :func:`n_for_mcnemar`: pairs needed for McNemar's test (Connor, Biometrics 1987; 43:207-211)::

      n = [z_{1-alpha/2} sqrt(psi) + z_{1-beta} sqrt(psi - delta^2)]^2 / delta^2,
      psi = p10 + p01 (discordant proportion), delta = p10 - p01.

Studies are sized by the number of diseased patients with ``n_neg = ceil(n_pos (1 - prev) / prev)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from scipy.stats import norm

from common.errors import ConfigError
from common.stats._checks import alpha_level

_MAX_N = 10_000_000


def _auc(value: float, name: str = "auc") -> float:
    v = float(value)
    if not 0.0 < v < 1.0:
        raise ConfigError(f"{name} must lie strictly between 0 and 1, got {value!r}")
    return v


def _prev(prevalence: float) -> float:
    p = float(prevalence)
    if not 0.0 < p < 1.0:
        raise ConfigError(f"prevalence must lie strictly between 0 and 1, got {prevalence!r}")
    return p


def hanley_mcneil_variance(auc: float, n_pos: int, n_neg: int) -> float:
    """Hanley-McNeil (1982) variance of the empirical AUC."""
    a = _auc(auc)
    if n_pos < 1 or n_neg < 1:
        raise ConfigError("n_pos and n_neg must be >= 1")
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    return (a * (1 - a) + (n_pos - 1) * (q1 - a * a) + (n_neg - 1) * (q2 - a * a)) / (
        n_pos * n_neg)


def _n_neg(n_pos: int, prevalence: float) -> int:
    return max(1, math.ceil(n_pos * (1 - prevalence) / prevalence - 1e-9))


def _smallest(ok: Callable[[int], bool]) -> int:
    """Smallest n_pos >= 1 with ok(n_pos) True (ok monotone), by doubling then bisection."""
    hi = 1
    while not ok(hi):
        hi *= 2
        if hi > _MAX_N:
            raise ConfigError("the target needs more than 10 million patients; relax it")
    lo = hi // 2  # ok(lo) is False (or lo == 0)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            hi = mid
        else:
            lo = mid
    return hi


def n_for_auc_halfwidth(
    auc: float, halfwidth: float, *, prevalence: float = 0.5, alpha: float = 0.05
) -> dict[str, Any]:
    """Patients needed so that the Wald CI of the AUC has half-width ``<= halfwidth``.

    Returns
    -------
    dict
        ``n_pos``, ``n_neg``, ``n_total`` and the ``halfwidth`` achieved.
    """
    a, p = _auc(auc), _prev(prevalence)
    if not 0.0 < halfwidth < 0.5:
        raise ConfigError(f"halfwidth must lie in (0, 0.5), got {halfwidth!r}")
    z = float(norm.ppf(1 - alpha_level(alpha) / 2))

    def hw(n_pos: int) -> float:
        return z * math.sqrt(hanley_mcneil_variance(a, n_pos, _n_neg(n_pos, p)))

    n_pos = _smallest(lambda m: hw(m) <= halfwidth)
    n_neg = _n_neg(n_pos, p)
    return {"n_pos": n_pos, "n_neg": n_neg, "n_total": n_pos + n_neg, "halfwidth": hw(n_pos),
            "method": "hanley-mcneil-1982"}


def auc_difference_variance(auc1: float, auc2: float, n_pos: int, n_neg: int, r: float) -> float:
    """``Var(A1) + Var(A2) - 2 r SE1 SE2`` with Hanley-McNeil variances (Hanley-McNeil 1983)."""
    v1 = hanley_mcneil_variance(auc1, n_pos, n_neg)
    v2 = hanley_mcneil_variance(auc2, n_pos, n_neg)
    return v1 + v2 - 2 * r * math.sqrt(v1 * v2)


def n_for_auc_difference(
    auc1: float, auc2: float, *, r: float = 0.0, prevalence: float = 0.5, alpha: float = 0.05,
    power: float = 0.8,
) -> dict[str, Any]:
    """Patients needed to detect ``auc1 != auc2`` (two-sided) with the given power.

    The smallest study with ``(z_{1-alpha/2} + z_{1-beta}) sqrt(V1) <= |auc1 - auc2|``,
    ``V1`` the variance of ``A_1 - A_2`` at the two alternative AUCs (Hanley-McNeil 1982
    variances, correlation ``r``): the variance DeLong's test estimates (see the module
    docstring). With ``r = 0`` (independent samples) the counts are per sample; with ``r > 0``
    they are the shared patients of a paired design.

    Returns
    -------
    dict
        ``n_pos``, ``n_neg``, ``n_total``, achieved ``power`` of the two-sided Wald test
        (normal approximation, both tails), ``method`` and ``design``.
    """
    a1, a2, p = _auc(auc1, "auc1"), _auc(auc2, "auc2"), _prev(prevalence)
    if a1 == a2:
        raise ConfigError("auc1 and auc2 must differ")
    if not -1.0 < r < 1.0:
        raise ConfigError(f"r must lie in (-1, 1), got {r!r}")
    if not 0.0 < power < 1.0:
        raise ConfigError(f"power must lie in (0, 1), got {power!r}")
    za = float(norm.ppf(1 - alpha_level(alpha) / 2))
    zb = float(norm.ppf(power))
    delta = abs(a1 - a2)

    def sd(m: int) -> float:
        return math.sqrt(auc_difference_variance(a1, a2, m, _n_neg(m, p), r))

    n_pos = _smallest(lambda m: (za + zb) * sd(m) <= delta)
    n_neg = _n_neg(n_pos, p)
    se = sd(n_pos)
    achieved = float(norm.cdf(delta / se - za) + norm.cdf(-delta / se - za))
    return {"n_pos": n_pos, "n_neg": n_neg, "n_total": n_pos + n_neg, "power": achieved,
            "method": "hanley-mcneil-1982/delong-1988-wald",
            "design": "paired" if r != 0 else "independent (per sample)"}


def n_for_mcnemar(
    p10: float, p01: float, *, alpha: float = 0.05, power: float = 0.8
) -> dict[str, Any]:
    """Pairs needed for McNemar's test (Connor 1987).

    Parameters
    ----------
    p10, p01
        Expected proportions of pairs where only model A (resp. only model B) is correct.
    """
    if not (0.0 <= p10 <= 1.0 and 0.0 <= p01 <= 1.0 and 0.0 < p10 + p01 <= 1.0):
        raise ConfigError("p10, p01 must be proportions with 0 < p10 + p01 <= 1")
    if p10 == p01:
        raise ConfigError("p10 and p01 must differ")
    if not 0.0 < power < 1.0:
        raise ConfigError(f"power must lie in (0, 1), got {power!r}")
    za = float(norm.ppf(1 - alpha_level(alpha) / 2))
    zb = float(norm.ppf(power))
    psi, delta = p10 + p01, p10 - p01
    n_exact = (za * math.sqrt(psi) + zb * math.sqrt(psi - delta * delta)) ** 2 / (delta * delta)
    return {"n_pairs": math.ceil(n_exact - 1e-9), "n_unrounded": n_exact, "method": "connor-1987"}
