"""``report.json`` documents shaped like the coordinator's, for the report-page tests.

:func:`run_report` is a completed three-hospital run with everything the page can show:
per-round ε per site, ledger heads, hospital-level DP, the final model's selection, an operating
point, calibration before and after recalibration, per-site AUCs, a meta-analysis, and the
internal keys and Flower node ids the page must never show. :func:`cv_report` is a k-fold
cross-validation. Both are built from the statistics library, so every figure is drawable.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from common.stats.calibration import calibration_bin_sums, reliability_diagram
from common.stats.meta import random_effects
from server.report_html import roc_section

SITES = ("site-1", "site-2", "site-3")
NODE_IDS = (14048164972659346592, 423845372883475924, 8909348903826039456)
EPSILON = ((5.786316398611922, 7.9965921572875835), (5.786316398611922, 7.9965921572875835),
           (4.1, 6.25))


def _scores(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = (rng.random(120) < 0.4).astype(int)
    s = 1 / (1 + np.exp(-(rng.normal(size=120) + 1.6 * y - 0.7)))
    return s, y


def _diagram(shift: float) -> dict[str, Any]:
    s, y = _scores(7)
    return dict(reliability_diagram(calibration_bin_sums(np.clip(s + shift, 0, 1), y)))


def _est(value: float, lower: float, upper: float, n: int, method: str) -> dict[str, Any]:
    return {"value": value, "lower": lower, "upper": upper, "se": 0.02, "n": n,
            "method": method}


def _train_row(i: int, r: int) -> dict[str, Any]:
    return {"site": SITES[i], "num-examples": 57.0, "train-loss": 0.6, "unit-weight": 1.0,
            "epsilon": EPSILON[i][r], "epsilon-prv": EPSILON[i][r] * 0.9, "delta": 1e-5,
            "noise-multiplier": 0.949, "sample-rate": 0.5, "epsilon-cap": 10.0,
            "epsilon-dataset": EPSILON[i][r]}


def run_report() -> dict[str, Any]:
    """A completed run's ``report.json`` with every optional part present."""
    hists = {name: _hist(seed) for seed, name in enumerate(SITES)}
    pooled = (sum(h[0] for h in hists.values()), sum(h[1] for h in hists.values()))
    meta = random_effects([0.86, 0.98, 0.71], [0.011, 0.0005, 0.023], site_names=list(SITES))
    rounds = []
    for r in range(2):
        rounds.append({
            "round": r + 1,
            "metrics": {"accuracy": 0.59, "auc": 0.91 + r / 100, "auc-pooled": 0.92 + r / 100,
                        "loss": 0.76 + r / 20, "train-loss": 0.74 + r / 10},
            "sites": [{"site": s, "auc": 0.9, "num-examples": 11.0, "unit-weight": 1.0}
                      for s in SITES],
            "train": [_train_row(i, r) for i in range(3)],
            "errors": [] if r == 0 else [
                {"site": f"node-{NODE_IDS[2]}", "node_id": NODE_IDS[2], "phase": "evaluate",
                 "reason": "no reply within the round timeout"}],
            "refusals": [],
        })
    sites = [{"site": s, "num_examples": 57 - i, "epsilon": EPSILON[i][1],
              "epsilon_prv": EPSILON[i][1] * 0.9, "epsilon_dataset": EPSILON[i][1] + i,
              "epsilon_cap": 10.0, "delta": 1e-5, "noise_multiplier": 0.949, "sample_rate": 0.5,
              "ledger_head": f"6:{i}e1d14265c2f10cff0b08baee460a840aa6c2fc7b54e6e8d6ca609df93f"}
             for i, s in enumerate(SITES)]
    inference = {
        "split": "test", "threshold": 0.43, "alpha": 0.05, "status": "completed", "reason": "",
        "n": 360, "sites": list(SITES), "noised": False, "suppressed_cells": 0,
        "confusion": {"tp": 100, "fp": 30, "tn": 200, "fn": 30},
        "metrics_note": "", "loglik": -37.76, "mean_loglik": -0.94, "auc_note": "",
        "failures": [{"node_id": NODE_IDS[1], "site": f"node-{NODE_IDS[1]}",
                      "query": "placements", "reason": "[site-2] refused: budget"}],
        "ledger_heads": {str(n): f"6:{n}" for n in NODE_IDS},
        "metrics": {"auc": _est(0.9509, 0.93, 0.97, 360, "delong"),
                    "accuracy": _est(0.83, 0.79, 0.87, 360, "wilson"),
                    "sensitivity": _est(0.77, 0.69, 0.83, 130, "wilson"),
                    "recall": _est(0.77, 0.69, 0.83, 130, "wilson"),
                    "specificity": _est(0.87, 0.82, 0.9, 230, "wilson"),
                    "precision": _est(0.77, 0.69, 0.83, 130, "wilson"),
                    "f1": _est(0.77, 0.7, 0.83, 360, "delta-logit"),
                    "brier": 0.12, "ece": 0.03},
        "auc_sites": [{"site": s, "n": 120, "n_pos": 48, "n_neg": 72, "auc": a, "value": a,
                       "lower": a - 0.1, "upper": min(a + 0.1, 1.0), "method": "delong",
                       "var": 0.01, "se": 0.1}
                      for s, a in zip(SITES, (0.86, 0.98, 0.71), strict=True)],
        "roc": roc_section(pooled, hists),
        "calibration": {**_diagram(0.0), "brier": 0.12, "ece": 0.03,
                        "before": {**_diagram(0.2), "brier": 0.2, "ece": 0.15,
                                   "sites": list(SITES)},
                        "after": {**_diagram(0.0), "brier": 0.12, "ece": 0.03},
                        "map": {"method": "platt", "intercept": -0.2, "slope": 0.8,
                                "temperature": 1.25},
                        "fitted_on": "validation",
                        "fit": {"status": "completed", "reason": "", "method": "platt",
                                "noised": False}},
        "operating_point": {"method": "youden", "target_sensitivity": None,
                            "calibrated_threshold": 0.38, "threshold": 0.4321,
                            "calibration": "platt", "temperature": 1.25, "intercept": -0.2,
                            "slope": 0.8, "chosen_on": "validation",
                            "source": "fine score histograms",
                            "validation": {"sensitivity": 0.8, "specificity": 0.9,
                                           "youden_j": 0.7, "tp": 40, "fp": 7, "tn": 63,
                                           "fn": 10, "sites": list(SITES)},
                            "note": ""},
        "meta": {"auc": meta.as_dict()},
    }
    return {
        "status": "completed", "reason": "", "run_id": "20261206T064049Z-3ee3553d",
        "rounds": rounds, "sites": sites,
        "privacy": {
            "unit": "patient (not image): one record per patient in DP-SGD",
            "guarantee": "patient-level (epsilon, delta)-DP at each hospital, for its own "
            "patients",
            "mechanism": "DP-SGD (Opacus), Poisson sampling of patients, one record per patient",
            "accountants": "RDP (epsilon) and PRV (epsilon_prv), both Opacus",
            "target_epsilon": 8.0, "max_grad_norm": 1.0, "scope": "epsilon: this run",
            "hospital_level": {"unit": "hospital", "mechanism": "fixed clipping",
                               "accountant": "Flower RdpAccountant", "noise_multiplier": 1.0,
                               "clipping_norm": 0.5, "delta": 0.001, "epsilon": 3.21,
                               "releases": 2},
            "not_covered": "exact releases carry no DP guarantee",
        },
        "excluded": [{"node_id": NODE_IDS[2], "reason": "[site-3] refused: over cap"},
                     {"node_id": 99999999999999999999, "reason": "refused: over cap"}],
        "final": {"split": "test", "auc_pooled": 0.9506,
                  "metrics": {"auc": 0.93, "auc-pooled": 0.9506, "accuracy": 0.83,
                              "loss": 0.4, "num-examples": 360.0},
                  "sites": [], "errors": []},
        "model_selection": {"final_round": 2, "selection": "best validation AUC",
                            "metric": "auc-pooled", "value": 0.93, "last_round": 2,
                            "candidates": [{"round": 1, "value": 0.92},
                                           {"round": 2, "value": 0.93}],
                            "checkpoint": "checkpoints/round-2.pt"},
        "inference": inference,
        "config": {"model": "cnn", "num-server-rounds": 2, "target-epsilon": 8.0,
                   "max-grad-norm": 1.0, "out-dir": "/tmp/somewhere", "private": True,
                   "hospital-dp-noise": 1.0, "hospital-dp-clip": 0.5},
    }


def _hist(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from common.stats.bins import class_histograms, uniform_edges

    s, y = _scores(seed)
    return class_histograms(s, y, uniform_edges(200))


def cv_report() -> dict[str, Any]:
    """A completed two-fold cross-validation's ``report.json`` (no ``sites``, no ``rounds``)."""
    run = run_report()
    folds = [{"fold": f, "held_out": f"fold-{f}", "status": "completed", "n": 120,
              "auc": _est(0.8 + f / 50, 0.7, 0.9, 120, "delong"),
              "accuracy": _est(0.7, 0.6, 0.8, 120, "wilson"),
              "epsilon_by_site": {s: (5.79, 8.0)[f] for s in SITES}, "issues": 0}
             for f in range(2)]
    return {
        "kind": "cross-validation", "run_id": None, "status": "completed", "reason": "",
        "config": {"model": "cnn", "cv-folds": 2, "target-epsilon": 8.0},
        "privacy": {"unit": "patient", "accountant": "rdp", "target_epsilon": 8.0,
                    "mechanism": "DP-SGD (Opacus), Poisson sampling of patients",
                    "not_covered": "held-out score histograms are released without noise"},
        "inference": {
            "roc": copy.deepcopy(run["inference"]["roc"]), "meta": {},
            "cv": {"metric": "auc", "mode": "kfold", "num_folds": 2, "alpha": 0.05,
                   "auc_method": "AUC of the pooled per-class score histograms",
                   "metric_ci_method": "wilson (threshold 0.5)", "folds": folds,
                   "pooled": {"held_out": "all folds", "n": 240,
                              "auc": _est(0.81, 0.75, 0.87, 240, "delong"),
                              "auc_mean": 0.81, "auc_sd": 0.014, "folds_included": [0, 1],
                              "note": "auc: pooled; auc_mean / auc_sd summarise the folds"},
                   "fold_details": [{"fold": f, "run_id": f"cv-42-fold-{f}", "status":
                                     "completed", "reason": "", "source": "query",
                                     "report": "/tmp/x/fold-0/report.json",
                                     "heldout_by_site": [], "errors": []}
                                    for f in range(2)]},
        },
        "html": "/tmp/x/report.html",
    }
