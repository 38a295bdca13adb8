"""Federated logistic regression over the four UCI Heart Disease hospitals equals statsmodels'
Logit on the pooled rows (coefficients, SEs, log-likelihood, AIC, BIC within 1e-6).

The nodes are the real ClientApp called in-process through ``InProcessGrid`` (no Ray); the
coordinator is :func:`server.inference.federated_logistic`. ``bench/heart_glm.py`` runs the same
code paths in Flower's simulation runtime.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import statsmodels.api as sm

from client.data.tabular import design_matrix, load_tabular
from common.config import NodeConfig
from server.inference import federated_logistic
from tests.client.queries.fake_grid import InProcessGrid

SITES = ("cleveland", "hungarian", "switzerland", "va")
COLUMNS = ["age", "sex", "cp=2", "cp=3", "cp=4", "trestbps", "chol", "fbs", "thalach",
           "exang", "oldpeak"]


@pytest.fixture
def paths(shared_file: Callable[[str], Path]) -> list[Path]:
    return [shared_file(f"heart_disease_uci/processed.{s}.data") for s in SITES]


def _nodes(paths: list[Path]) -> dict[int, NodeConfig]:
    return {100 + i: NodeConfig(data_dir=p.parent, site_name=s, tabular_path=p)
            for i, (s, p) in enumerate(zip(SITES, paths, strict=True))}


def _reference(paths: list[Path]) -> object:
    xs, ys = zip(*(design_matrix(load_tabular(p), COLUMNS) for p in paths), strict=True)
    return sm.Logit(np.concatenate(ys), np.vstack(xs)).fit(method="newton", tol=1e-12,
                                                           maxiter=100, disp=0)


def _check(result: dict, ref: object) -> None:  # type: ignore[type-arg]
    fit = result["fit"]
    coef = np.array([c["coef"] for c in fit["coefficients"]])
    se = np.array([c["se"] for c in fit["coefficients"]])
    assert np.max(np.abs(coef - ref.params)) <= 1e-6  # type: ignore[attr-defined]
    assert np.max(np.abs(se - ref.bse)) <= 1e-6  # type: ignore[attr-defined]
    assert abs(fit["loglik"] - ref.llf) <= 1e-6  # type: ignore[attr-defined]
    assert abs(fit["aic"] - ref.aic) <= 1e-6  # type: ignore[attr-defined]
    assert abs(fit["bic"] - ref.bic) <= 1e-6  # type: ignore[attr-defined]
    assert abs(fit["lr_stat"] - ref.llr) <= 1e-6  # type: ignore[attr-defined]
    assert fit["n"] == int(ref.nobs)  # type: ignore[attr-defined]


def test_four_hospitals_equal_pooled_statsmodels(paths: list[Path]) -> None:
    grid = InProcessGrid(_nodes(paths))
    result = federated_logistic(grid, grid.get_node_ids(), COLUMNS, timeout=5)
    assert result["status"] == "completed" and result["failures"] == []
    assert sorted(result["sites"]) == sorted(SITES) and result["fit"]["n"] == 740
    _check(result, _reference(paths))


def test_silent_or_refusing_node_is_listed_and_fit_uses_the_others(paths: list[Path]) -> None:
    nodes = _nodes(paths)
    nodes[102] = NodeConfig(data_dir=paths[2].parent, site_name="switzerland",
                            tabular_path=paths[2], min_release_count=100)  # 46 rows: refuses
    grid = InProcessGrid(nodes, silent=[103])
    result = federated_logistic(grid, grid.get_node_ids(), COLUMNS, timeout=5)
    assert result["status"] == "completed"
    reasons = {f["node_id"]: f["reason"] for f in result["failures"]}
    assert set(reasons) == {102, 103}
    assert "minimum release count" in reasons[102] and "timeout" in reasons[103]
    assert sorted(result["sites"]) == ["cleveland", "hungarian"]
    _check(result, _reference(paths[:2]))
