"""Report fragments of the regression and segmentation tasks (HTML, summary, CLI rows).

Sections are built from real pooled statistics (:mod:`common.stats.regression`,
:mod:`common.stats.segmentation`) in the schema of :mod:`server.inference_regression` and
:mod:`server.inference_segmentation`; the tests check what a reader sees: the numbers,
escaping of hospital names and notes, the agreement plot's drawn bias, limits, bands and
histogram bars, and the synthetic (never patient) overlays.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.patches import Rectangle

from common.config import TrainPlan
from common.stats.regression import abs_error_quantile, regression_metrics, regression_node_stats
from common.stats.segmentation import SegmentationSums, segmentation_summary
from server.report_task_measures import (
    plot_agreement,
    regression_rows,
    regression_section_html,
    regression_summary_lines,
    segmentation_overlays_html,
    segmentation_rows,
    segmentation_section_html,
    segmentation_summary_lines,
    synthetic_phantoms,
)
from server.report_text import fmt, fmt_interval

EVIL = "<script>x</script>"


def _regression_section() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    y = rng.uniform(0, 50, 80)
    p = np.clip(y + rng.normal(1.0, 4.0, 80), 0, 60)
    sums = regression_node_stats(y, p, abs_error_upper=60.0, bins=20)
    metrics = regression_metrics(sums).as_dict()
    med = abs_error_quantile(sums, 0.5)
    hist = {"edges": sums.edges().tolist(), "counts": sums.abs_error_hist.tolist(), "sites": 2,
            "median": {"lower": med.lower, "upper": med.upper, "n": med.n}}
    return {"task": "regression", "status": "completed", "reason": "", "n": 80,
            "sites": ["north", EVIL], "noised": False, "suppressed_cells": 0,
            "note": f"pooled over 2 of 3 sites {EVIL}",
            "value_range": {"lower": 0.0, "upper": 60.0, "units": "target units"},
            "regression": {**metrics, "median_abs_error": hist["median"],
                           "bland_altman": {"bias": metrics["bias"],
                                            "loa_lower": metrics["loa_lower"],
                                            "loa_upper": metrics["loa_upper"],
                                            "sd_difference": metrics["sd_difference"],
                                            "z": 1.96, "difference": "prediction - target"},
                           "abs_error_histogram": hist,
                           "per_site": [{"site": "north", "n": 50, "mae": 3.25, "bias": 0.5,
                                         "rmse": 4.0},
                                        {"site": EVIL, "n": 30, "mae": None, "bias": None,
                                         "rmse": None}]}}


def _segmentation_section() -> dict[str, Any]:
    sums = SegmentationSums(n=40, sum_dice=30.0, sum_dice_sq=23.5, n_hd95=34, sum_hd95=68.0,
                            sum_hd95_sq=170.0, n_empty_both=4, n_empty_one=2)
    site = SegmentationSums(n=25, sum_dice=20.0, sum_dice_sq=16.5, n_hd95=22, sum_hd95=40.0,
                            sum_hd95_sq=90.0, n_empty_both=2, n_empty_one=1)
    other = SegmentationSums(n=15, sum_dice=10.0, sum_dice_sq=7.0, n_hd95=12, sum_hd95=28.0,
                             sum_hd95_sq=80.0, n_empty_both=2, n_empty_one=1)
    pooled = segmentation_summary(sums).as_dict()
    return {"task": "segmentation", "status": "completed", "reason": "", "n": 40,
            "sites": ["north", EVIL], "noised": False, "suppressed_cells": 0, "note": "",
            "hd95_units": "pixels of the model's input grid",
            "segmentation": {**pooled, "per_site": [
                {"site": "north", **segmentation_summary(site).as_dict()},
                {"site": EVIL, **segmentation_summary(other).as_dict()}]}}


def _pngs(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'data:image/png;base64,([^"]+)"', page)]


def test_regression_html_shows_the_pooled_estimates_escaped() -> None:
    # Prepare
    sec = _regression_section()
    reg = sec["regression"]
    # Execute
    page = regression_section_html(sec)
    # Assert: headline MAE with its interval, the clipping range, one embedded PNG, escaping
    mae = reg["mae"]
    assert f"<strong>{fmt_interval(mae)}</strong>" in page  # 3 significant digits
    assert fmt_interval(reg["loa_upper"]) in page and fmt_interval(reg["pearson_r"]) in page
    assert "[0, 60]" in page and "No patient's value reached the coordinator" in page
    assert len(_pngs(page)) == 1 and _pngs(page)[0].startswith(b"\x89PNG")
    assert EVIL not in page and "&lt;script&gt;" in page
    assert f"<td>{fmt(reg['r2'], 4)}</td>" in page and "<td>3.25</td>" in page
    assert "2 of 3 sites" in page


def test_agreement_plot_draws_bias_limits_bands_and_the_histogram() -> None:
    # Prepare
    sec = _regression_section()
    reg = sec["regression"]
    # Execute
    fig = plot_agreement(reg, sec["value_range"])
    left, right = fig.axes
    # Assert: horizontal lines at the limits, bias and 0; a band per interval
    ys = sorted(line.get_ydata()[0] for line in left.get_lines())
    expected = sorted([reg["loa_lower"]["value"], reg["bias"]["value"],
                       reg["loa_upper"]["value"], 0.0])
    assert ys == pytest.approx(expected)
    bands = sorted((p.get_y(), p.get_y() + p.get_height()) for p in left.patches)
    if not bands:  # axhspan gives Polygons in some matplotlib versions
        bands = sorted((float(np.min(p.get_xy()[:, 1])), float(np.max(p.get_xy()[:, 1])))
                       for p in left.patches)
    want = sorted((reg[key]["lower"], reg[key]["upper"])
                  for key in ("loa_lower", "bias", "loa_upper"))
    assert len(left.patches) == 3
    assert np.allclose(bands, want)
    assert left.get_xlim() == (0.0, 60.0)
    # ... and one bar per histogram bin with the pooled counts, the median's bin orange
    bars = [p for p in right.patches if isinstance(p, Rectangle)]
    hist = reg["abs_error_histogram"]
    assert [b.get_height() for b in bars] == hist["counts"]
    orange = [i for i, b in enumerate(bars) if b.get_facecolor()[:3] == pytest.approx(
        (1.0, 0.498, 0.055), abs=1e-2)]
    assert orange == [int(np.searchsorted(hist["edges"], hist["median"]["lower"],
                                          side="right")) - 1]


def test_regression_rows_and_summary_lines_carry_the_values() -> None:
    # Prepare
    sec = _regression_section()
    reg = sec["regression"]
    # Execute
    rows = dict(regression_rows(sec))
    lines = regression_summary_lines(sec)
    # Assert
    assert rows["patients"] == "80"
    assert rows["mean absolute error"] == (f"{reg['mae']['value']:.3f} (95% CI "
                                           f"{reg['mae']['lower']:.3f}-{reg['mae']['upper']:.3f})")
    assert rows["R²"] == f"{reg['r2']:.3f}"
    assert rows["Bland-Altman bias"].startswith(f"{reg['bias']['value']:.3f}")
    med = reg["median_abs_error"]
    assert rows["median absolute error (bin)"] == f"{med['lower']:.3g} to {med['upper']:.3g}"
    assert f"test Pearson r: {rows['Pearson r']}" in lines and len(lines) == len(rows) - 1


def test_failed_sections_say_why_and_escape_the_reason() -> None:
    # Prepare
    failed = {"status": "failed", "reason": f"no node answered {EVIL}"}
    # Execute / Assert
    for render in (regression_section_html, segmentation_section_html):
        page = render(failed)
        assert "No pooled" in page and EVIL not in page and "&lt;script&gt;" in page
    assert regression_rows(failed) == [("status", f"failed: no node answered {EVIL}")]
    assert segmentation_summary_lines({}) == ["segmentation inference failed: no section"]
    assert regression_summary_lines(failed)[0].startswith("regression inference failed")


def test_segmentation_html_rows_and_lines_show_pooled_and_site_values() -> None:
    # Prepare
    sec = _segmentation_section()
    seg = sec["segmentation"]
    # Execute
    page = segmentation_section_html(sec, overlays_html="<figure>o</figure>")
    rows = dict(segmentation_rows(sec))
    lines = segmentation_summary_lines(sec)
    # Assert: pooled Dice 30/40 = 0.75 and HD95 68/34 = 2 px with t intervals
    assert seg["dice"]["value"] == pytest.approx(0.75) and seg["hd95"]["value"] == 2.0
    assert rows["mean Dice"] == (f"0.750 (95% CI {seg['dice']['lower']:.3f}-"
                                 f"{seg['dice']['upper']:.3f})")
    assert rows["mean HD95 (pixels)"].startswith("2.000 (95% CI")
    assert rows["both masks empty"] == "4" and rows["one mask empty"] == "2"
    assert "0.75" in page and "34 patients" in page and page.endswith("<figure>o</figure>")
    assert EVIL not in page and "&lt;script&gt;" in page and "0.8" in page  # site: 20/25
    assert "test mean Dice: " + rows["mean Dice"] in lines


def test_synthetic_phantoms_show_a_bright_lesion_under_its_mask() -> None:
    # Execute
    images, masks = synthetic_phantoms(32)
    # Assert: three non-empty masks on the model grid, the lesion brighter than the rest
    assert images.shape == (3, 1, 32, 32) and masks.shape == (3, 32, 32)
    assert all(m.any() and not m.all() for m in masks)
    for image, mask in zip(images[:, 0], masks, strict=True):
        assert image[mask].mean() > image[~mask].mean() + 0.1


def test_overlays_are_captioned_synthetic_and_accept_weights_or_a_model() -> None:
    # Prepare
    from client.app import build_plan_model

    plan = TrainPlan(task="segmentation", num_classes=2, image_size=16, model="unet",
                     run_id="t")
    torch.manual_seed(0)
    model = build_plan_model(plan)
    # Execute
    from_model = segmentation_overlays_html(model, plan)
    from_state = segmentation_overlays_html(model.state_dict(), plan)
    volume = segmentation_overlays_html(model, TrainPlan(task="segmentation", image_size=16,
                                                         model="unet", samples="volume-3d"))
    # Assert
    for page in (from_model, from_state):
        assert page.startswith("<figure>") and len(_pngs(page)) == 1
        assert "Synthetic phantom slices, not patients" in page
    assert volume == ""
