"""The privacy section of ``report.html``: what the patients were promised, in plain words.

Reads ``report.json``'s ``sites`` (ε, δ, σ, cap, ledger head per hospital), ``rounds`` (the ε
each hospital reported after each round), ``privacy`` (unit, accountants, clipping norm,
``hospital_level``) and, for a cross-validation, ``inference.cv.folds[*].epsilon_by_site``.
It writes sentences first (for a review board), then the tables and a plot of ε against round
(or fold) per hospital, then the ledger heads an auditor checks the hospitals' ledgers against.
Every part is optional: what the report lacks is left out, never guessed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from server.report_text import fmt, fmt_delta, fmt_epsilon, label, site_label

__all__ = ["epsilon_by_fold", "epsilon_by_round", "privacy_section"]

ImgFn = Callable[[Any, str], str]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def epsilon_by_round(report: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Site -> ``[(round, ε after that round)]`` from ``rounds[*].train`` (this run's ε)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for entry in report.get("rounds") or []:
        if not isinstance(entry, Mapping):
            continue
        for row in entry.get("train") or []:
            eps = _num(row.get("epsilon")) if isinstance(row, Mapping) else None
            if eps is not None and isinstance(entry.get("round"), int):
                out.setdefault(site_label(row.get("site")), []).append((entry["round"], eps))
    return out


def epsilon_by_fold(report: Mapping[str, Any]) -> dict[str, list[tuple[int, float]]]:
    """Site -> ``[(fold, ε after that fold)]`` from a cross-validation's fold rows."""
    cv = (report.get("inference") or {}).get("cv") or {}
    out: dict[str, list[tuple[int, float]]] = {}
    for row in cv.get("folds") or []:
        by_site = row.get("epsilon_by_site") if isinstance(row, Mapping) else None
        if not isinstance(by_site, Mapping) or not isinstance(row.get("fold"), int):
            continue
        for site, eps in by_site.items():
            if _num(eps) is not None:
                out.setdefault(site_label(site), []).append((row["fold"], float(eps)))
    return out


def _same(values: Sequence[Any]) -> Any:
    """The common value of ``values`` (floats equal to 3 significant digits), else None."""
    nums = [_num(v) for v in values]
    if not nums or any(v is None for v in nums):
        return None
    first = nums[0]
    assert first is not None
    return first if all(f"{v:.3g}" == f"{first:.3g}" for v in nums) else None


def _per_site(rows: Sequence[Mapping[str, Any]], key: str, show: Callable[[Any], str]) -> str:
    """"x" when every hospital has the same value, else "site-1 x, site-2 y"."""
    common = _same([r.get(key) for r in rows])
    if common is not None:
        return show(common)
    return ", ".join(f"{html.escape(site_label(r.get('site')))} {show(r.get(key))}"
                     for r in rows)


def _eps(v: Any) -> str:
    return fmt_epsilon(v)


def _guarantee(rows: Sequence[Mapping[str, Any]], what: str) -> str:
    pairs = [(r.get("epsilon"), r.get("delta")) for r in rows]
    if _same([e for e, _ in pairs]) is not None and _same([d for _, d in pairs]) is not None:
        eps, delta = pairs[0]
        return (f"<p><strong>Each hospital's patients are protected by (ε = {_eps(eps)}, "
                f"δ = {fmt_delta(delta)})-differential privacy at the patient level for "
                f"{what}.</strong></p>")
    each = "; ".join(f"{html.escape(site_label(r.get('site')))}: (ε = {_eps(r.get('epsilon'))}, "
                     f"δ = {fmt_delta(r.get('delta'))})" for r in rows)
    return (f"<p><strong>Each hospital's patients are protected by differential privacy at the "
            f"patient level for {what}</strong> — {each}.</p>")


_MEANING = (
    "<p>The unit of privacy is the <em>patient</em>: all images of one patient count as one "
    "record. Everything the hospitals released during training (their model updates) would "
    "have been almost as likely had any single patient's records been left out: ε bounds how "
    "much more likely (smaller is stronger), and δ is the small probability that this bound "
    "does not hold. Each hospital computes and enforces its own guarantee, for its own "
    "patients; the coordinator only proposes the plan.</p>")


def _mechanism(rows: Sequence[Mapping[str, Any]], privacy: Mapping[str, Any]) -> str:
    own = privacy.get("training")
    if isinstance(own, str) and own:  # a workflow that is not DP-SGD says how it trained
        return f"<p>{html.escape(own)}</p>"
    parts = ["<p>Training used DP-SGD (Opacus): in every step each patient's gradient was "]
    clip = _num(privacy.get("max_grad_norm"))
    parts.append(f"clipped to a norm of at most {fmt(clip)} " if clip is not None else "clipped ")
    parts.append("and Gaussian noise with noise multiplier σ = "
                 f"{_per_site(rows, 'noise_multiplier', lambda v: fmt(v, 3))} was added")
    if any(_num(r.get("sample_rate")) is not None for r in rows):
        parts.append("; patients were sampled with probability q = "
                     f"{_per_site(rows, 'sample_rate', lambda v: fmt(v, 3))} per step")
    return "".join(parts) + ".</p>"


def _cap(rows: Sequence[Mapping[str, Any]]) -> str:
    if not any(_num(r.get("epsilon_cap")) is not None for r in rows):
        return ""
    each = "; ".join(f"{html.escape(site_label(r.get('site')))} has spent ε = "
                     f"{_eps(r.get('epsilon_dataset'))} of its cap of {fmt(r.get('epsilon_cap'))}"
                     for r in rows)
    return ("<p>Each hospital also enforces a <em>cap</em> on the total ε its dataset may spend "
            "over every run and fold, kept in its signed, hash-chained privacy ledger, and "
            f"refuses any plan that would exceed it. After this run: {each}.</p>")


def _accountants(rows: Sequence[Mapping[str, Any]]) -> str:
    text = ("<p>ε is computed with Opacus's Rényi-DP (RDP) accountant, the one the cap is "
            "enforced with")
    prv = [r.get("epsilon_prv") for r in rows]
    if any(_num(v) is not None for v in prv):
        text += ("; Opacus's PRV accountant gives a tighter ε = "
                 f"{_per_site(rows, 'epsilon_prv', _eps)} for the same training, shown for "
                 "comparison")
    return text + (". An auditor can recompute every ε from the ledger entries with "
                   "<code>vesalius audit verify</code> (Google's dp-accounting).</p>")


_SPENT = frozenset({"epsilon", "epsilon_prv", "epsilon_dataset"})
"""The site table's columns that are privacy spent: shown rounded up (:func:`fmt_epsilon`)."""


def _site_cell(column: str, value: Any) -> str:
    if column == "delta":
        return fmt_delta(value)
    if column in _SPENT and value is not None:
        return fmt_epsilon(value, 3)
    return fmt(value, 4)


def _site_table(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = [c for c in ("num_examples", "epsilon", "epsilon_prv", "epsilon_dataset",
                        "epsilon_cap", "delta", "noise_multiplier", "sample_rate")
            if any(r.get(c) is not None for r in rows)]
    head = "<tr><th>Hospital</th>" + "".join(f"<th>{label(c)}</th>" for c in cols) + "</tr>"
    body = ""
    for r in rows:
        cells = "".join(
            f"<td>{_site_cell(c, r.get(c))}</td>" for c in cols)
        body += f"<tr><td>{html.escape(site_label(r.get('site')))}</td>{cells}</tr>"
    return f'<table class="privacy-sites numbers">{head}{body}</table>'


def _series_table(series: Mapping[str, Sequence[tuple[int, float]]], unit: str) -> str:
    steps = sorted({x for pts in series.values() for x, _ in pts})
    names = sorted(series)
    head = (f"<tr><th>{html.escape(unit.capitalize())}</th>"
            + "".join(f"<th>ε {html.escape(n)}</th>" for n in names) + "</tr>")
    body = ""
    for step in steps:
        cells = ""
        for n in names:
            vals = [e for x, e in series[n] if x == step]
            cells += f"<td>{_eps(vals[-1]) if vals else '&ndash;'}</td>"
        body += f"<tr><td>{step}</td>{cells}</tr>"
    return f'<table class="epsilon-rounds numbers">{head}{body}</table>'


def _ledger_heads(rows: Sequence[Mapping[str, Any]]) -> str:
    heads = [r for r in rows if r.get("ledger_head")]
    if not heads:
        return ""
    body = "".join(f"<tr><td>{html.escape(site_label(r.get('site')))}</td>"
                   f"<td><code>{html.escape(str(r['ledger_head']))}</code></td></tr>"
                   for r in heads)
    return ("<h3>Ledger heads (audit anchors)</h3><p>Each hospital's ledger head "
            "(<code>entry:hash</code>) after its last release in this run. An auditor at the "
            "hospital checks that its ledger still contains these entries, unchanged, with "
            "<code>vesalius audit verify --expect-head</code>.</p>"
            f'<table class="ledger-heads"><tr><th>Hospital</th><th>Ledger head</th></tr>'
            f"{body}</table>")


def _hospital_level(h: Mapping[str, Any]) -> str:
    eps, delta = h.get("epsilon"), h.get("delta")
    return ("<h3>Hospital-level differential privacy</h3>"
            f"<p>In addition, each hospital's whole contribution (all its patients together) is "
            f"protected by (ε = {_eps(eps)}, δ = {fmt_delta(delta)})-differential privacy over "
            f"{fmt(h.get('releases'))} aggregate release(s): the coordinator clipped every "
            f"hospital's model update to a norm of {fmt(h.get('clipping_norm'))}, averaged them "
            "with equal weights and added Gaussian noise with multiplier "
            f"σ = {fmt(h.get('noise_multiplier'), 3)} (Flower's server-side fixed-clipping DP, "
            "accounted with Flower's RDP accountant). This is a separate guarantee from the "
            "patient-level one above.</p>")


def privacy_section(report: Mapping[str, Any], img: ImgFn) -> str:
    """The HTML body of the privacy section (without its heading).

    Parameters
    ----------
    report
        ``report.json`` content of a run or a cross-validation.
    img
        ``img(figure, alt)`` -> an inline ``<img>`` (see :mod:`server.report_html`).
    """
    from server.plots import plot_epsilon

    privacy: Mapping[str, Any] = report.get("privacy") or {}
    config: Mapping[str, Any] = report.get("config") or {}
    rows = [r for r in report.get("sites") or [] if isinstance(r, Mapping)]
    is_cv = report.get("kind") == "cross-validation"
    non_private = (config.get("private") is False
                   or str(privacy.get("guarantee", "")).startswith("none"))
    if non_private:
        return ("<p><strong>This run was trained without differential privacy</strong> (a "
                "non-private baseline): no ε guarantee applies to its patients.</p>")
    parts: list[str] = []
    series = epsilon_by_fold(report) if is_cv else epsilon_by_round(report)
    what = "the whole cross-validation (all folds together)" if is_cv else "this run"
    if rows:
        parts.append(_guarantee(rows, what))
    elif series:
        last = [{"site": n, "epsilon": max(pts)[1]} for n, pts in sorted(series.items())]
        eps = _per_site(last, "epsilon", _eps)
        parts.append(f"<p><strong>Each hospital's patients are protected by (ε = {eps}, "
                     f"δ)-differential privacy at the patient level for {what}</strong>, "
                     "where δ is each hospital's own (at most 1e-5; this report does not "
                     "list it: see the folds' own reports).</p>")
    parts.append(_MEANING)
    if rows:
        parts += [_mechanism(rows, privacy), _cap(rows), _accountants(rows)]
    target = _num(privacy.get("target_epsilon"))
    if target is not None:
        parts.append(f"<p>The plan's target was ε = {fmt(target)} per hospital for {what}; each "
                     "hospital derived its noise from it and its own data.</p>")
    if rows:
        parts.append(_site_table(rows))
    if series:
        unit = "fold" if is_cv else "round"
        caps = [_num(r.get("epsilon_cap")) for r in rows]
        cap = min((c for c in caps if c is not None), default=None)
        parts.append(f"<h3>ε per hospital after each {unit}</h3>"
                     f"<p>This {'cross-validation' if is_cv else 'run'}'s ε as each hospital "
                     f"reported it after the {unit} (it only grows).</p>"
                     f'<div class="figs">{_series_table(series, unit)}'
                     + img(plot_epsilon(series, xlabel=unit, target=target, cap=cap),
                           f"ε per hospital against {unit}") + "</div>")
    hospital = privacy.get("hospital_level")
    if isinstance(hospital, Mapping) and hospital:
        parts.append(_hospital_level(hospital))
    parts.append(_ledger_heads(rows))
    from server.report_secagg import secagg_html
    from server.report_text import scrub

    parts.append(secagg_html(report.get("secure_aggregation"), scrub))
    caveat = privacy.get("not_covered")
    if caveat:
        parts.append(f'<p class="note"><strong>Not covered by ε:</strong> '
                     f"{html.escape(str(caveat))}.</p>")
    return "".join(parts)
