"""Federated logistic regression over the four real UCI Heart Disease hospitals."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import statsmodels.api as sm

from common.stats.glm import add_intercept, fit_logistic, logistic_node_stats, summing_stats_fn

FILES = ("cleveland", "hungarian", "switzerland", "va")
KEEP = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]  # FLamby: drop slope, ca, thal (10-12); 13 is num


def _site(path: Path) -> tuple[np.ndarray, np.ndarray]:
    rows = [line.split(",") for line in path.read_text().splitlines() if line.strip()]
    table = [[r[i] for i in KEEP] + [r[13]] for r in rows]
    table = [r for r in table if "?" not in r]
    arr = np.array(table, dtype=float)
    return arr[:, :-1], (arr[:, -1] > 0).astype(int)


def test_heart_disease_four_hospitals_equal_pooled_logit(
    shared_file: Callable[[str], Path],
) -> None:
    # Prepare: one node per hospital (rows filtered as in FLamby: 303/261/46/130)
    sites = [_site(shared_file(f"heart_disease_uci/processed.{f}.data")) for f in FILES]
    assert [x.shape[0] for x, _ in sites] == [303, 261, 46, 130]
    sites = [(add_intercept(x), y) for x, y in sites]
    fn = summing_stats_fn([lambda b, x=x, y=y: logistic_node_stats(x, y, b) for x, y in sites])
    # Execute
    fit = fit_logistic(fn, 11)
    # Assert against statsmodels on the pooled rows
    x = np.vstack([s[0] for s in sites])
    y = np.concatenate([s[1] for s in sites])
    ref = sm.Logit(y, x).fit(disp=0, tol=1e-12, maxiter=100)
    diffs = np.concatenate([np.abs(fit.coef - ref.params), np.abs(fit.se - ref.bse),
                            [abs(fit.aic - ref.aic), abs(fit.bic - ref.bic)]])
    assert diffs.max() <= 1e-6
    assert fit.n == 740
