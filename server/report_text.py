"""Words and numbers for ``report.html``: human labels, number formats, site names.

The page is read by people outside the project (a review board, a hospital's data-protection
officer), so nothing on it may be an internal key (``loglik``, ``noised``, ``epsilon_prv``) or
a Flower node id (a 64-bit integer that names no hospital). This module holds

* :data:`LABELS` and :func:`label`: the human label of every metric and field the report
  shows, and a readable fallback for keys it does not know;
* :func:`fmt`, :func:`fmt_interval`, :func:`format_cell`: numbers, intervals and nested
  values as escaped HTML text;
* :func:`scrub`, :func:`site_label`: text with node ids replaced by "an unnamed node", and the
  name a reply should be shown under.

Every function returns HTML-escaped text, so report content can never inject markup.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from common.privacy.display import epsilon_text

__all__ = ["LABELS", "UNNAMED_NODE", "cv_table_html", "fmt", "fmt_delta", "fmt_interval",
           "fmt_epsilon", "format_cell", "label", "scrub", "site_label", "strip_site_prefix"]

UNNAMED_NODE = "an unnamed node"

# Flower node ids: 64-bit integers (usually 18-20 digits), alone or as ``node-<id>``.
_NODE_ID = re.compile(r"\bnode[-_ ]?\d+\b|\b\d{15,20}\b", re.IGNORECASE)
_SITE_PREFIX = re.compile(r"^\[([\w .\-]{1,64})\]\s*")

LABELS: dict[str, str] = {
    # discrimination and threshold metrics
    "auc": "AUC (area under the ROC curve)",
    "auc-pooled": "AUC of the pooled scores",
    "auc_pooled": "AUC of the pooled scores",
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity (true-positive rate)",
    "recall": "Recall (= sensitivity)",
    "specificity": "Specificity (true-negative rate)",
    "precision": "Precision (positive predictive value)",
    "f1": "F1 score",
    "youden_j": "Youden's J (sensitivity + specificity − 1)",
    "brier": "Brier score (lower is better)",
    "ece": "Expected calibration error (lower is better)",
    "loss": "Validation loss (cross-entropy)",
    "train-loss": "Training loss",
    "intercept": "Calibration intercept (ideal 0)",
    "slope": "Calibration slope (ideal 1)",
    "temperature": "Temperature",
    # counts
    "n": "Patients",
    "n_pos": "Positive patients",
    "n_neg": "Negative patients",
    "num-examples": "Patients",
    "num_examples": "Training patients",
    "tp": "True positives", "fp": "False positives", "tn": "True negatives",
    "fn": "False negatives",
    # CV
    "fold": "Fold", "held_out": "Held out", "status": "Status", "issues": "Problems",
    "epsilon_by_site": "ε so far per hospital", "auc_mean": "Mean of the folds' AUCs",
    "auc_sd": "SD of the folds' AUCs", "folds_included": "Folds included",
    "num_folds": "Folds", "mode": "Design", "metric": "Primary metric",
    "auc_method": "How the AUC was computed", "metric_ci_method": "Intervals of the other metrics",
    "train_patients_by_site": "Training patients per hospital",
    "heldout_by_site": "Held-out AUC per hospital", "holdout_site": "Held-out hospital",
    "run_id": "Run", "confusion": "Confusion counts", "errors": "Problems",
    # meta-analysis
    "tau2": "τ² (between-hospital variance)",
    "i2": "I² (share of the variation due to differences between hospitals)",
    "q": "Cochran's Q", "q_pvalue": "p-value of Q", "k": "Hospitals", "scale": "Scale",
    "fixed_estimate": "Fixed-effect estimate", "fixed_se": "Fixed-effect standard error",
    "se": "Standard error", "method": "Method", "alpha": "Significance level",
    # privacy
    "epsilon": "ε this run (RDP)", "epsilon_prv": "ε this run (PRV)",
    "epsilon_dataset": "ε dataset total (all runs)", "epsilon_cap": "ε cap",
    "delta": "δ", "noise_multiplier": "Noise multiplier σ", "sample_rate": "Sampling rate q",
    "ledger_head": "Ledger head (audit anchor)", "clipping_norm": "Clipping norm",
    "releases": "Releases",
    # operating point and selection
    "threshold": "Decision threshold (on the model's own scores)",
    "shares_needed": "Hospitals needed to unmask the sum (secret-sharing threshold)",
    "sites_summed": "Hospitals in the sum",
    "calibrated_threshold": "Decision threshold (on the calibrated probabilities)",
    "target_sensitivity": "Target sensitivity", "calibration": "Recalibration",
    "chosen_on": "Chosen on", "source": "From", "final_round": "Final model from round",
    "selection": "Selection rule", "value": "Value", "last_round": "Last round",
    "checkpoint": "Checkpoint", "note": "Note", "fitted_on": "Fitted on",
    "query_rounds": "Query rounds", "statistic": "Statistic", "pvalue": "p-value",
    "p": "p-value", "diff": "Difference", "z": "z",
}

SHORT_LABELS: dict[str, str] = {
    "auc": "AUC [95% CI]", "accuracy": "Accuracy", "sensitivity": "Sensitivity",
    "specificity": "Specificity", "precision": "Precision", "f1": "F1", "n": "Patients",
}
"""Column headings where the full label would not fit (the CV table)."""

METHODS: dict[str, str] = {
    "wilson": "Wilson score", "beta": "Clopper–Pearson", "delong": "DeLong",
    "delta-logit": "delta method (logit)", "wald": "Wald", "dersimonian-laird":
    "DerSimonian–Laird", "node-reported": "reported by the hospital", "youden":
    "Youden's J (maximum sensitivity + specificity)", "target-sensitivity":
    "highest threshold reaching the target sensitivity", "platt": "Platt scaling",
    "temperature": "temperature scaling", "none": "none", "kfold": "k-fold",
    "loso": "leave one hospital out", "raw": "raw", "logit": "logit (back-transformed)",
}


def label(key: str) -> str:
    """The human label of ``key`` (escaped HTML); unknown keys lose ``_``/``-`` and get a
    capital."""
    text = LABELS.get(str(key))
    if text is None:
        words = re.sub(r"[_\-]+", " ", str(key)).strip()
        text = words[:1].upper() + words[1:]
    return html.escape(scrub(text))


def scrub(text: str) -> str:
    """``text`` with every Flower node id (``node-<id>`` or a 15-20 digit number) replaced."""
    return _NODE_ID.sub(UNNAMED_NODE, str(text))


def site_label(site: Any, reason: Any = "") -> str:
    """The name to show for a reply's sender (plain text, not escaped).

    A real site name is kept; a ``node-<id>`` placeholder is replaced by the ``[site]`` prefix
    nodes put on their error reasons, or by :data:`UNNAMED_NODE`.
    """
    name = "" if site is None else str(site)
    if name and not _NODE_ID.fullmatch(name):
        return name
    match = _SITE_PREFIX.match(str(reason or ""))
    return match.group(1) if match else UNNAMED_NODE


def strip_site_prefix(reason: Any) -> str:
    """A node's reason without its ``[site]`` prefix, node ids scrubbed (plain text)."""
    return scrub(_SITE_PREFIX.sub("", str(reason or "")).strip())


def _number(v: float, digits: int) -> str:
    if not math.isfinite(v):
        return "&ndash;"
    if abs(v) < 1e-12:
        return "0"
    if float(v).is_integer() and abs(v) < 1e15:
        return str(int(v))
    return f"{v:.{digits}g}"


def fmt(v: Any, digits: int = 4) -> str:
    """One value as escaped text: ``–`` for missing or undefined, yes/no, ``digits``
    significant digits for floats (values below 1e-12 in magnitude print as 0)."""
    if v is None or (isinstance(v, str) and not v):
        return "&ndash;"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _number(v, digits)
    if isinstance(v, int):
        return str(v)
    return html.escape(scrub(str(v)))


def fmt_epsilon(v: Any, decimals: int = 2) -> str:
    """ε with ``decimals`` decimals, rounded *up* so that the page never understates a privacy
    loss (:func:`common.privacy.display.epsilon_shown`)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "&ndash;"
    return epsilon_text(float(v), decimals)


def fmt_delta(v: Any) -> str:
    """δ in short scientific notation (``1e-5``, ``2.5e-6``)."""
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
        return "&ndash;"
    text = f"{float(v):.2g}"
    return re.sub(r"e([-+])0*(\d)", lambda m: "e" + m.group(1).replace("+", "") + m.group(2),
                  text)


def fmt_interval(est: Mapping[str, Any], digits: int = 3) -> str:
    """``0.813 (95% CI 0.678–0.949)`` from an ``Estimate.as_dict()`` (escaped text)."""
    value = est.get("value", est.get("estimate"))
    lo, hi = est.get("lower"), est.get("upper")
    text = fmt(value, digits)
    if lo is not None and hi is not None:
        text += f" (95% CI {fmt(lo, digits)}&ndash;{fmt(hi, digits)})"
    return text


def format_cell(v: Any) -> str:
    """A value or an interval dict ``{"value", "lower", "upper"}`` as table-cell HTML."""
    if isinstance(v, Mapping) and "value" in v:
        lo, hi = v.get("lower"), v.get("upper")
        ci = f" [{fmt(lo)}, {fmt(hi)}]" if lo is not None and hi is not None else ""
        return f"{fmt(v.get('value'))}{ci}"
    if isinstance(v, Mapping):
        return ", ".join(f"{html.escape(scrub(str(a)))}: {format_cell(b)}"
                         for a, b in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(format_cell(x) for x in v)
    if isinstance(v, str) and str(v) in METHODS:
        return html.escape(METHODS[str(v)])
    return fmt(v)


def _cv_cell(key: str, v: Any) -> str:
    if key == "epsilon_by_site" and isinstance(v, Mapping):
        return "<br>".join(f"{html.escape(site_label(a))}: {fmt_epsilon(b)}"
                           for a, b in sorted(v.items()))
    return format_cell(v)


def cv_table_html(cv: Mapping[str, Any]) -> str:
    """HTML table of cross-validation results: one row per fold and a pooled row.

    ``cv = {"folds": [{"fold": 1, "auc": {"value", "lower", "upper"}, "n": ..., ...}],
    "pooled": {"auc": {...}, ...}}``; columns are the union of keys over rows (``fold`` first,
    human labels), intervals render as ``value [lower, upper]``. All text is HTML-escaped.
    """
    folds: Sequence[Mapping[str, Any]] = cv.get("folds") or []
    pooled: Mapping[str, Any] = cv.get("pooled") or {}
    skip = {"fold", "note", "folds_included", "n_pos", "n_neg", "auc_mean", "auc_sd"}
    cols: list[str] = []
    for row in [*folds, pooled]:
        for key in row:
            if key not in skip and key not in cols:
                cols.append(key)
    head = "".join(f"<th>{html.escape(SHORT_LABELS[c]) if c in SHORT_LABELS else label(c)}</th>"
                   for c in ["fold", *cols])
    body = []
    for row in folds:
        cells = "".join(f"<td>{_cv_cell(c, row.get(c))}</td>" for c in cols)
        body.append(f"<tr><td>{fmt(row.get('fold'))}</td>{cells}</tr>")
    if pooled:
        cells = "".join(f"<td>{_cv_cell(c, pooled.get(c))}</td>" for c in cols)
        body.append(f'<tr class="pooled"><td>pooled</td>{cells}</tr>')
    return (f'<table class="cv"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(body)}</tbody></table>")
