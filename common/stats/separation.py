"""Constant covariates, collinearity and separation in a federated logistic regression.

The coordinator of :func:`common.stats.glm.fit_logistic` sees only summed statistics (score
vector, information matrix, log-likelihood, row count), never the rows, so the checks work on
those and on the Newton path:

* :func:`check_information`: before the first step, the information matrix in correlation
  form reveals a covariate that takes one value in every row (weighted correlation 1 with the
  intercept) or collinear covariates (an eigenvalue of ~0), independently of their scales.
* :class:`SeparationMonitor`: complete or quasi-complete separation (Albert & Anderson,
  Biometrika 1984; 71:1-10), under which the maximum-likelihood estimates do not exist, is
  recognised from the path's signature: the log-likelihood levels off while the coefficients
  keep moving by the same step in the same direction.

Both tests are invariant to the covariates' scales (Newton's method is affine-invariant), so a
coefficient of 85 on a covariate measured in hundredths is fitted, not called separation.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.errors import DataError


class ConstantCovariateError(DataError):
    """A covariate takes one value in every row (collinear with the intercept).

    Attributes
    ----------
    index
        Column of the constant covariate in the design.
    """

    def __init__(self, message: str, *, index: int) -> None:
        super().__init__(message, safe_reason="a covariate is constant: its coefficient is "
                                              "undefined")
        self.index = index


class SeparationError(DataError):
    """The outcome is (quasi-)completely separated: the maximum-likelihood estimate does not exist.

    Attributes
    ----------
    diverging
        Columns whose coefficients grow without bound along the Newton path.
    complete
        True when every fitted probability has gone to its own outcome (complete separation).
    """

    def __init__(self, message: str, *, diverging: Sequence[int], complete: bool) -> None:
        super().__init__(message, safe_reason="logistic regression did not converge: the "
                                              "outcome is separated by the covariates")
        self.diverging = list(diverging)
        self.complete = complete


# Separation test (see SeparationMonitor): the Newton decrement below SEP_DECREMENT nats, the step
# not shrinking (ratio of successive steps in [SEP_RATIO_LOW, SEP_RATIO_HIGH]) and pointing
# the same way (cosine >= SEP_COSINE), for SEP_PERSIST consecutive iterations.
SEP_DECREMENT = 1e-5
SEP_RATIO_LOW, SEP_RATIO_HIGH = 0.5, 2.0
SEP_COSINE = 0.99
SEP_PERSIST = 3
COMPLETE_LOGLIK = 1e-6  # -loglik below this: every fitted probability is within ~1e-6 of y
COLLINEAR_EIG = 1e-12  # smallest eigenvalue of the information in correlation form
DECREMENT_CONVERGED = 1e-20  # Newton decrement / max(1, |ll|) at which ll cannot rise further


def _column_names(idx: Sequence[int], names: Sequence[str] | None) -> str:
    """Quoted names of the columns ``idx`` (``x<i>`` without names)."""
    return ", ".join(repr(names[i]) if names is not None else f"x{i}" for i in idx)


def check_information(
    h: np.ndarray, free: np.ndarray, intercept_index: int | None, names: Sequence[str] | None
) -> None:
    """Refuse a design whose information matrix is singular before any Newton step.

    Works on the information in correlation form ``D^-1/2 H D^-1/2`` (``D = diag H``), which
    does not depend on the covariates' scales. With an intercept, a covariate whose weighted
    correlation with it is 1 takes one value in every row (its weighted variance is 0).

    Parameters
    ----------
    h
        Summed information matrix ``X'WX`` at the starting coefficients.
    free
        Columns being fitted.
    intercept_index
        Column holding the intercept (``None``: no constant-covariate check).
    names
        Column names for the messages.

    Raises
    ------
    ConstantCovariateError
        A covariate is zero in every row, or takes one value in every row.
    DataError
        Collinear covariates (smallest eigenvalue of the correlation form <= 1e-12).
    """
    hf = h[np.ix_(free, free)]
    d = np.diag(hf).copy()
    zero = [int(free[i]) for i in np.flatnonzero(d <= 0)]
    if zero:
        raise ConstantCovariateError(
            f"covariate(s) {_column_names(zero, names)} are zero in every row (or every row has "
            "weight 0): their coefficients are undefined; drop them", index=zero[0])
    c = hf / np.sqrt(np.outer(d, d))
    if intercept_index is not None and intercept_index in free:
        i0 = int(np.flatnonzero(free == intercept_index)[0])
        for j in range(free.size):
            if j != i0 and 1.0 - c[i0, j] ** 2 <= COLLINEAR_EIG:
                col = int(free[j])
                raise ConstantCovariateError(
                    f"covariate {_column_names([col], names)} takes the same value in every "
                    "row: it is collinear with the intercept and its coefficient is undefined; "
                    "drop it",
                    index=col)
    eig, vec = np.linalg.eigh(c)
    if eig[0] <= COLLINEAR_EIG:
        involved = [int(free[i]) for i in np.flatnonzero(np.abs(vec[:, 0]) > 0.1)]
        raise DataError(
            f"the information matrix is singular: covariates {_column_names(involved, names)} are "
            "collinear (one is a linear combination of the others); drop or combine them",
            safe_reason="logistic regression did not converge: collinear covariates")


class SeparationMonitor:
    """Detects a Newton path that runs off to infinity (the MLE does not exist).

    Under complete or quasi-complete separation (Albert & Anderson, Biometrika 1984;
    71:1-10) the log-likelihood rises to its supremum (0 for complete separation) while the
    coefficients move along a separating direction ``d`` forever: the separated observations'
    fitted probabilities go to 0/1 and their weights ``p (1 - p)`` vanish, so the Newton step
    tends to the constant vector ``d`` while the Newton decrement ``g' H^-1 g`` (twice the
    predicted log-likelihood gain) decays geometrically. A fit that converges instead takes
    steps that shrink quadratically once the decrement is small. Newton's method is
    affine-invariant, so this test does not depend on the covariates' scales (a coefficient of
    85 on a covariate measured in hundredths is no sign of separation): the decrement is
    invariant, and the step ratio and cosine are invariant for the near-parallel steps the
    test looks for.

    The signature, for ``SEP_PERSIST`` consecutive full (not halved) steps: decrement
    <= ``SEP_DECREMENT`` nats, successive step norms within a factor 2, cosine >= 0.99.
    """

    def __init__(self) -> None:
        self.prev: np.ndarray | None = None
        self.streak = 0
        self.history: list[np.ndarray] = []

    def update(self, step: np.ndarray, decrement: float) -> bool:
        """Record a full Newton step; True once the separation signature has persisted."""
        prev, self.prev = self.prev, step
        self.history = [*self.history[-2:], step]
        if prev is None:
            return False
        n_prev, n_step = float(np.linalg.norm(prev)), float(np.linalg.norm(step))
        if n_prev == 0.0 or n_step == 0.0:
            self.streak = 0
            return False
        ratio = n_step / n_prev
        cosine = float(step @ prev) / (n_step * n_prev)
        steady = (SEP_RATIO_LOW <= ratio <= SEP_RATIO_HIGH and cosine >= SEP_COSINE
                  and decrement <= SEP_DECREMENT)
        self.streak = self.streak + 1 if steady else 0
        return self.streak >= SEP_PERSIST

    def reset(self) -> None:
        """Forget the path (after a halved step, which is no evidence either way)."""
        self.prev, self.streak, self.history = None, 0, []

    def diverging(self, free: np.ndarray) -> list[int]:
        """Free columns whose own step has not shrunk over the recorded steps."""
        h = np.abs(np.vstack(self.history))
        keep = np.all(h[1:] >= 0.5 * h[:-1], axis=0) & (h[-1] > 0)
        return [int(free[i]) for i in np.flatnonzero(keep)]


def separation_error(
    sep: SeparationMonitor, free: np.ndarray, ll: float, it: int, names: Sequence[str] | None
) -> SeparationError:
    """The error to raise once ``sep`` has seen separation (complete when -ll <= 1e-6)."""
    cols = sep.diverging(free) or [int(i) for i in free]
    complete = -ll <= COMPLETE_LOGLIK
    kind = ("complete separation: every fitted probability has gone to its own outcome"
            if complete else "quasi-complete separation: the fitted probabilities of some rows "
            "go to 0 or 1")
    return SeparationError(
        f"the outcome is separated by the covariates ({kind}; log-likelihood {ll:.6g} after "
        f"{it} Newton steps while coefficient(s) {_column_names(cols, names)} keep growing): "
        "maximum-likelihood estimates do not exist (drop or merge the separating covariates, "
        "or use penalised regression)", diverging=cols, complete=complete)
