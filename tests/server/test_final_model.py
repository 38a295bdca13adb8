"""Final model, federated recalibration and operating point against the pooled computation.

Nodes are served in-process by the real ClientApp (``InProcessGrid``); reference values come
from SciPy (maximum likelihood), scikit-learn (ROC curve, confusion matrix, Brier score) and
statsmodels (Wilson intervals) on the pooled per-patient scores.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from scipy.optimize import minimize
from scipy.special import logit
from sklearn.metrics import brier_score_loss, confusion_matrix, roc_auc_score, roc_curve
from statsmodels.stats.proportion import proportion_confint

from client.app import _load, heldout_split
from common import messages as k
from common.config import NodeConfig
from common.stats.bins import fine_score_edges
from common.stats.calibration import ScoreCalibration
from server.app import final_model
from server.final_model import (
    SELECTION_AUC,
    SELECTION_LOSS,
    calibrated_inference,
    load_checkpoint,
    select_final_round,
)
from server.inference import score_calibration
from server.strategies.fedavg import RoundLog, SiteReply
from tests.client.queries.fake_grid import InProcessGrid
from tests.client.queries.federation import PLAN, image_nodes, model_arrays, reference_scores

CAL_BINS = 7


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fed")


def _centred(seed: int = 0) -> ArrayRecord:
    """A fresh model whose logits straddle 0 on these sites (a random model's crowd at +5,
    where no temperature can be fitted: it would only rescale them)."""
    state = model_arrays(seed).to_torch_state_dict()
    state["classifier.bias"] = state["classifier.bias"] + torch.tensor([2.5, -2.5])
    return ArrayRecord(state)


def _pooled(nodes: dict[int, NodeConfig], arrays: ArrayRecord, split: str
            ) -> tuple[np.ndarray, np.ndarray]:
    parts = [reference_scores(n, arrays, split) for n in nodes.values()]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _nll(eta: np.ndarray, y: np.ndarray) -> float:
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta))


def _ece(s: np.ndarray, y: np.ndarray, bins: int) -> float:
    edges = np.linspace(0, 1, bins + 1)
    idx = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    return float(sum(abs(y[idx == b].sum() - s[idx == b].sum()) for b in range(bins)) / s.size)


@pytest.mark.parametrize("method", ["temperature", "platt"])
def test_federated_recalibration_equals_scipy_on_pooled_validation_scores(
    root: Path, method: str
) -> None:
    # Prepare
    nodes = image_nodes(root)
    a = _centred()
    s, y = _pooled(nodes, a, k.SPLIT_VAL)
    z, yf = logit(np.clip(s, 1e-12, 1 - 1e-12)), y.astype(float)
    if method == "temperature":
        ref = minimize(lambda t: _nll(z / t[0], yf), x0=[1.0], method="Nelder-Mead",
                       options={"xatol": 1e-10, "fatol": 1e-12}).x
        expected = [0.0, 1.0 / ref[0]]
    else:
        expected = minimize(lambda ab: _nll(ab[0] + ab[1] * z, yf), x0=[0.0, 1.0],
                            method="BFGS", options={"gtol": 1e-10}).x
    # Execute
    res = score_calibration(InProcessGrid(nodes), list(nodes), a, PLAN, method=method,
                            timeout=5)
    # Assert
    assert res["status"] == "completed" and res["sites"] == ["h1", "h2"]
    cal = res["calibration"]
    assert [cal["intercept"], cal["slope"]] == pytest.approx(expected, abs=1e-5)
    assert cal["temperature"] == pytest.approx(1.0 / cal["slope"])


@pytest.mark.parametrize("target", [0.0, 0.9])
def test_operating_point_is_chosen_on_validation_and_test_metrics_are_computed_at_it(
    root: Path, target: float
) -> None:
    # Prepare
    nodes = image_nodes(root)
    a = _centred()
    grid = InProcessGrid(nodes)
    sv, yv = _pooled(nodes, a, k.SPLIT_VAL)
    st, yt = _pooled(nodes, a, k.SPLIT_TEST)
    # Execute
    sec = calibrated_inference(grid, list(nodes), a, PLAN, timeout=5,
                               target_sensitivity=target, calibration_bins=CAL_BINS)
    # Assert: the map is the one fitted on validation, the threshold is chosen on the
    # calibrated validation scores as sklearn's ROC curve would choose it ...
    op = sec["operating_point"]
    assert sec["status"] == "completed" and sec["failures"] == [] and op["note"] == ""
    assert op["chosen_on"] == "validation" and op["source"] == "fine score histograms"
    cal = ScoreCalibration(op["calibration"], op["intercept"], op["slope"])
    pv, pt = cal.apply(sv), cal.apply(st)
    fpr, tpr, thr = roc_curve(yv, pv, drop_intermediate=False)
    pick = (int(np.argmax(tpr - fpr)) if target == 0
            else int(np.flatnonzero(tpr >= target)[0]))
    ref_val = confusion_matrix(yv, pv >= thr[pick], labels=[0, 1]).ravel()
    val = op["validation"]
    assert [val["tn"], val["fp"], val["fn"], val["tp"]] == ref_val.tolist()
    assert op["method"] == ("youden" if target == 0 else "target-sensitivity")
    assert op["calibrated_threshold"] in fine_score_edges()
    assert float(cal.apply(np.array([op["threshold"]]))[0]) == pytest.approx(
        op["calibrated_threshold"], abs=1e-9)
    # ... and the test metrics are those of the pooled calibrated test scores at it.
    tn, fp, fn, tp = confusion_matrix(yt, pt >= op["calibrated_threshold"], labels=[0, 1]).ravel()
    assert sec["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert sec["threshold"] == op["calibrated_threshold"]
    sens = sec["metrics"]["sensitivity"]
    lo, hi = proportion_confint(tp, tp + fn, alpha=0.05, method="wilson")
    assert (sens["value"], sens["lower"], sens["upper"]) == pytest.approx(
        (tp / (tp + fn), lo, hi), abs=1e-12)
    assert sec["metrics"]["specificity"]["value"] == pytest.approx(tn / (tn + fp))
    assert abs(sec["metrics"]["auc"]["value"] - roc_auc_score(yt, st)) <= 2e-3
    # Calibration of the test scores before and after the map.
    before, after = sec["calibration"]["before"], sec["calibration"]["after"]
    assert before["brier"] == pytest.approx(brier_score_loss(yt, st), rel=1e-9)
    assert after["brier"] == pytest.approx(brier_score_loss(yt, pt), rel=1e-9)
    assert before["ece"] == pytest.approx(_ece(st, yt.astype(float), CAL_BINS), rel=1e-9)
    assert after["ece"] == pytest.approx(_ece(pt, yt.astype(float), CAL_BINS), rel=1e-9)
    assert sec["metrics"]["ece"] == after["ece"] and sec["calibration"]["ece"] == after["ece"]
    assert len(before["mean_score"]) == len(after["observed"]) == CAL_BINS
    assert sec["calibration"]["fitted_on"] == "validation"


def _lists(reply: Message) -> list[tuple[str, list[object]]]:
    return [(key, value) for record in reply.content.values()
            if isinstance(record, MetricRecord | ConfigRecord)
            for key, value in record.items() if isinstance(value, list)]


def test_every_reply_of_the_flow_is_a_sum_of_fixed_length(root: Path) -> None:
    # Prepare
    nodes = image_nodes(root)
    grid = InProcessGrid(nodes)
    counts = {heldout_split(n, PLAN, _load(n, PLAN), s).num_patients
              for n in nodes.values() for s in (k.SPLIT_VAL, k.SPLIT_TEST)}
    allowed = {fine_score_edges().size - 1, CAL_BINS, 100, 1, 2, 4}
    assert not allowed & counts, "fixture: bin counts must differ from patient counts"
    # Execute
    calibrated_inference(grid, list(nodes), model_arrays(1), PLAN, timeout=5,
                         calibration_bins=CAL_BINS)
    # Assert
    assert grid.replies and not any(r.has_error() for r in grid.replies)
    asked = {str(m.content[k.CONFIG][k.QUERY]) for m in grid.sent}
    assert asked == {"calibration-glm", "metrics", "placements"}
    for reply in grid.replies:
        for key, value in _lists(reply):
            assert len(value) in allowed and len(value) not in counts, (key, len(value))


def test_a_node_refuses_malformed_calibration_coefficients(root: Path) -> None:
    # Prepare
    nodes = image_nodes(root)
    grid = InProcessGrid(nodes)
    from server.inference import _metrics_config, _metrics_round

    cfg = _metrics_config(PLAN, split=k.SPLIT_TEST, threshold=0.5, calibration_bins=CAL_BINS,
                          calibration=[0.0, float("inf")])
    # Execute
    res = _metrics_round(grid, list(nodes), cfg, model_arrays(0), timeout=5)
    # Assert
    assert not res.values and len(res.failures) == 2
    assert all("'beta'" in f["reason"] for f in res.failures)


# --- model selection -------------------------------------------------------------------------


def _round(r: int, **metrics: float) -> RoundLog:
    reply = SiteReply("h1", 1, {k.NUM_EXAMPLES: 10.0})
    return RoundLog(round=r, train=[reply], evaluate=[reply], evaluate_metrics=dict(metrics))


def test_selection_takes_the_best_pooled_validation_auc_ties_to_the_later_round() -> None:
    rounds = [_round(1, **{k.AUC_POOLED: 0.7, k.AUC: 0.9, k.LOSS: 0.5}),
              _round(2, **{k.AUC_POOLED: 0.8, k.AUC: 0.6, k.LOSS: 0.9}),
              _round(3, **{k.AUC_POOLED: 0.8, k.AUC: 0.6, k.LOSS: 0.4}),
              _round(4, **{k.AUC_POOLED: 0.75, k.AUC: 0.6, k.LOSS: 0.1})]
    sel = select_final_round(rounds)
    assert sel is not None
    assert (sel["final_round"], sel["selection"], sel["metric"]) == (3, SELECTION_AUC,
                                                                      k.AUC_POOLED)
    assert sel["last_round"] == 4 and len(sel["candidates"]) == 4


def test_selection_falls_back_to_mean_site_auc_then_to_loss() -> None:
    partial = [_round(1, **{k.AUC_POOLED: 0.9, k.AUC: 0.7}), _round(2, **{k.AUC: 0.8})]
    sel = select_final_round(partial)
    assert sel is not None and (sel["final_round"], sel["metric"]) == (2, k.AUC)
    no_auc = [_round(1, **{k.AUC: float("nan"), k.LOSS: 0.3}), _round(2, **{k.LOSS: 0.2})]
    sel = select_final_round(no_auc)
    assert sel is not None
    assert (sel["final_round"], sel["selection"]) == (2, SELECTION_LOSS)
    assert select_final_round([RoundLog(round=1)]) is None


def test_final_model_loads_the_selected_checkpoint_or_keeps_the_last(tmp_path: Path) -> None:
    # Prepare
    a, b = model_arrays(0), model_arrays(1)
    torch.save(a.to_torch_state_dict(), tmp_path / "round-1.pt")
    rounds = [_round(1, **{k.AUC_POOLED: 0.9}), _round(2, **{k.AUC_POOLED: 0.6})]
    # Execute
    arrays, sel = final_model(rounds, tmp_path, b)
    kept, missing = final_model(rounds, tmp_path / "nowhere", b)
    # Assert
    first = next(iter(a.to_torch_state_dict().values()))
    assert torch.equal(next(iter(arrays.to_torch_state_dict().values())), first)
    assert sel["final_round"] == 1 and sel["checkpoint"] == "checkpoints/round-1.pt"
    assert kept is b and missing["selection"] == "last round" and missing["final_round"] == 2
    assert load_checkpoint(tmp_path, 7) is None


def test_a_slope_that_would_reverse_the_ranking_leaves_the_scores_uncalibrated(root: Path) -> None:
    # Prepare: a random model's validation logits all lie near +5: the best temperature is
    # about 0 (every probability 0.5) and here slightly negative.
    nodes = image_nodes(root)
    # Execute
    res = score_calibration(InProcessGrid(nodes), list(nodes), model_arrays(0), PLAN,
                            method="temperature", timeout=5)
    # Assert
    assert res["status"] == "failed" and "reverse the ranking" in res["reason"]
    assert res["fit"]["coefficients"][0]["coef"] <= 0
    assert res["calibration"] == {"method": "none", "intercept": 0.0, "slope": 1.0,
                                  "temperature": 1.0}


def test_suppressed_calibration_cells_are_counted_from_the_fine_histograms(root: Path) -> None:
    # Prepare: cells of 1-3 patients are released as 0 at each node
    nodes = image_nodes(root, min_release_count=4)
    a = _centred()
    st, yt = _pooled(nodes, a, k.SPLIT_TEST)
    # Execute
    sec = calibrated_inference(InProcessGrid(nodes), list(nodes), a, PLAN, timeout=5,
                               calibration_bins=10)
    # Assert: every patient is in the diagrams; ECE as on the pooled scores up to the fine
    # bins' width; Brier exact (its sum is released whole).
    assert sec["suppressed_cells"] > 0
    op = sec["operating_point"]
    pt = ScoreCalibration(op["calibration"], op["intercept"], op["slope"]).apply(st)
    for name, scores in (("before", st), ("after", pt)):
        curve = sec["calibration"][name]
        assert sum(curve["count"]) == st.size and "fine bins' centres" in curve["note"]
        assert curve["count"] == np.histogram(scores, bins=np.linspace(0, 1, 11))[0].tolist()
        assert curve["ece"] == pytest.approx(_ece(scores, yt.astype(float), 10), abs=2e-4)
        assert curve["brier"] == pytest.approx(brier_score_loss(yt, scores), rel=1e-9)
