"""CV-based selection with Holm correction, on paired DeLong tests from node sums."""

from __future__ import annotations

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from common.errors import ConfigError, DataError
from common.stats import sum_stats
from common.stats.auc import node_placement_sums, paired_delong_from_sums
from common.stats.bins import class_histograms, uniform_edges
from common.stats.selection import aic, bic, holm_adjust, select_by_cv
from tests.common.stats.sites import split_indices


def test_select_by_cv_with_paired_delong_and_holm() -> None:
    # Prepare: four candidates' out-of-fold scores on the same 900 patients, across 3 sites
    rng = np.random.default_rng(2)
    n = 900
    y = (rng.random(n) < 0.4).astype(int)
    base = rng.normal(size=n)
    strengths = {"cnn": 1.6, "resnet": 1.5, "logreg": 0.7, "tiny": 0.2}
    scores = {k: 1 / (1 + np.exp(-(base + v * y + 0.8 * rng.normal(size=n))))
              for k, v in strengths.items()}
    names = list(scores)
    parts = split_indices(rng, n, 3)
    edges = uniform_edges(200)
    hists = [tuple(sum(class_histograms(scores[m][i], y[i], edges)[c] for i in parts)
                   for c in (0, 1)) for m in names]
    sums = sum_stats([node_placement_sums([scores[m][i] for m in names], y[i], hists,
                                          edges=edges) for i in parts])
    aucs = {m: float(sums["v10_sum"][j] / sums["n_pos"]) for j, m in enumerate(names)}

    def pval(best: str, other: str) -> float:
        return paired_delong_from_sums(sums, names.index(best), names.index(other)).p

    # Execute
    res = select_by_cv(aucs, pval, alpha=0.05)
    # Assert
    assert res.best == max(aucs, key=aucs.get)  # type: ignore[arg-type]
    others = [m for m in names if m != res.best]
    raw = [pval(res.best, m) for m in others]
    reject, adj, _, _ = multipletests(raw, alpha=0.05, method="holm")
    assert [res.adjusted[m] for m in others] == pytest.approx(list(adj), abs=1e-15)
    assert [res.rejected[m] for m in others] == list(reject)
    assert "tiny" not in res.indistinguishable and res.best in res.indistinguishable
    assert res.as_dict()["method"] == "holm"


def test_select_with_mapping_and_losses() -> None:
    res = select_by_cv({"a": 0.30, "b": 0.25, "c": 0.4}, {"a": 0.2, "c": 0.001},
                       higher_is_better=False)
    assert res.best == "b"
    assert res.rejected == {"a": False, "c": True}
    assert res.adjusted["a"] == pytest.approx(0.2) and res.adjusted["c"] == pytest.approx(0.002)
    with pytest.raises(DataError):
        select_by_cv({"a": 0.3, "b": 0.2}, {})
    with pytest.raises(ConfigError):
        select_by_cv({}, {})
    with pytest.raises(DataError):
        holm_adjust({"a": 1.5})


def test_information_criteria_rank_models_and_validate() -> None:
    assert aic(-100.0, 3) == 206.0
    assert bic(-100.0, 3, 100) == pytest.approx(200 + 3 * np.log(100))
    with pytest.raises(DataError):
        aic(5.0, 2)
    with pytest.raises(DataError):
        bic(-1.0, 2, 0)
