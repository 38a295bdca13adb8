"""McNemar from summed discordant counts equals statsmodels on the pooled paired table."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.contingency_tables import mcnemar

from common.errors import DataError
from common.stats import sum_stats
from common.stats.hypothesis import discordant_counts, mcnemar_test
from tests.common.stats.sites import split_indices


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize(("exact", "correction"), [(True, True), (False, True), (False, False)])
def test_mcnemar_pooled_equals_statsmodels(seed: int, exact: bool, correction: bool) -> None:
    # Prepare: two models whose correctness differs on some patients
    rng = np.random.default_rng(seed)
    n = 160 if exact else 900
    y = rng.integers(0, 2, size=n)
    sa = np.clip(y * 0.6 + rng.random(n) * 0.5, 0, 1)
    sb = np.clip(y * 0.5 + rng.random(n) * 0.55, 0, 1)
    parts = split_indices(rng, n, 3)
    # Execute
    c = sum_stats([discordant_counts(sa[i], sb[i], y[i]) for i in parts])
    res = mcnemar_test(c["b"], c["c"], exact=exact, correction=correction)
    # Assert against statsmodels on the pooled 2x2 table (rows: A right/wrong)
    ok_a, ok_b = (sa >= 0.5) == y, (sb >= 0.5) == y
    table = [[np.sum(ok_a & ok_b), np.sum(ok_a & ~ok_b)], [np.sum(~ok_a & ok_b),
                                                            np.sum(~ok_a & ~ok_b)]]
    ref = mcnemar(table, exact=exact, correction=correction)
    assert res.statistic == pytest.approx(ref.statistic, abs=1e-12)
    assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-10, abs=1e-15)
    assert sum(c.values()) == n


@pytest.mark.parametrize(("b", "c"), [(0, 0), (5, 5), (0, 7), (12, 3), (40, 61)])
def test_mcnemar_edge_counts(b: int, c: int) -> None:
    for exact, corr in [(True, True), (False, True), (False, False)]:
        res = mcnemar_test(b, c, exact=exact, correction=corr)
        if b + c == 0:
            assert res.pvalue == 1.0
            continue
        ref = mcnemar([[10, b], [c, 10]], exact=exact, correction=corr)
        assert res.pvalue == pytest.approx(ref.pvalue, rel=1e-10)


def test_mcnemar_rejects_bad_counts() -> None:
    with pytest.raises(DataError):
        mcnemar_test(-1, 3)
    with pytest.raises(DataError):
        mcnemar_test(1.5, 3)
    with pytest.raises(DataError):
        discordant_counts([0.1, 0.2], [0.3], [0, 1])
