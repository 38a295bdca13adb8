"""Between-hospital meta-analysis of each task's headline metric (server/inference_tasks.py)."""

from __future__ import annotations

import numpy as np
import pytest

from common.stats.meta import random_effects
from server.inference_tasks import add_meta_analysis


def test_regression_sites_are_pooled_by_random_effects_on_their_own_mae() -> None:
    section = {"status": "completed", "regression": {"per_site": [
        {"site": "a", "n": 30, "mae": 2.0, "mae_se": 0.3},
        {"site": "b", "n": 20, "mae": 3.5, "mae_se": 0.5},
        {"site": "c", "n": 5, "mae": 1.0, "mae_se": None},  # no SE: left out
    ]}}
    add_meta_analysis("regression", section)
    meta = section["meta_mae"]
    expected = random_effects([2.0, 3.5], [0.09, 0.25], site_names=["a", "b"]).as_dict()
    assert meta == expected
    assert [row["site"] for row in meta["sites"]] == ["a", "b"]
    # the DerSimonian-Laird estimate lies between the sites' own values
    assert 2.0 < meta["pooled"]["estimate"] < 3.5


def test_segmentation_reads_estimate_dicts_and_one_site_gives_no_meta() -> None:
    rows = [{"site": "a", "dice": {"value": 0.8, "se": 0.05}},
            {"site": "b", "dice": {"value": 0.6, "se": 0.1}}]
    section = {"status": "completed", "segmentation": {"per_site": rows}}
    add_meta_analysis("segmentation", section)
    w = 1 / np.array([0.0025, 0.01])
    fixed = float(np.sum(w * [0.8, 0.6]) / np.sum(w))
    assert section["meta_dice"]["fixed_estimate"] == pytest.approx(fixed)
    lone = {"status": "completed", "segmentation": {"per_site": rows[:1]}}
    add_meta_analysis("segmentation", lone)
    assert "meta_dice" not in lone
