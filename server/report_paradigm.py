"""The report's paradigm section: what a non-default ``--paradigm`` adds to a run's report.

A paradigm workflow (:mod:`common.paradigms`) writes ``report.extra["paradigm"]``, a JSON-safe
mapping, and this module shows it the same way on the screen, in ``summary.txt`` and in
``report.html``, so that no paradigm needs a renderer of its own::

    {"name": "transfer", "summary": "...", "options": {"freeze": "trunk"},
     "scope": "what the report's Result and Privacy sections describe, when a paradigm
               runs several models (shown first, above the Result)",
     "headline": {"metric": "AUC", "value": 0.81, "lower": 0.74, "upper": 0.88,
                  "method": "delong", "n": 120, "what": "Pooled test AUC of the ensemble",
                  "source": "how it was computed (one sentence)"},
     "notes": ["one sentence", ...],
     "tables": [{"title": "Transfer vs scratch at the same ε",
                 "columns": ["model", "test AUC", "ε"], "rows": [["scratch", 0.71, 7.99]]}],
     "plots": [{"title": "validation AUC per round", "x_label": "round", "y_label": "AUC",
                "x": [1, 2, 3], "series": {"scratch": [0.6, 0.7, 0.71]}}]}

``headline`` (optional) replaces the one-model headline of the Result (on the screen, in
``summary.txt`` and in ``report.html``) when the run's result is not one model's: an
ensemble leads with the ensemble's pooled AUC, not its member 0's.

Every text is escaped; numbers are formatted with 3 decimals. Nothing here may hold a
per-patient value: only what the nodes released (sums, counts, DP models) and what the
coordinator computed from it.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["paradigm_headline", "paradigm_headline_html", "paradigm_headline_text",
           "paradigm_lines", "paradigm_scope_html", "paradigm_section_html"]


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    if value is None:
        return "–"
    return str(value)


def _tables(section: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [t for t in section.get("tables") or [] if isinstance(t, Mapping)]


def paradigm_lines(section: Any) -> list[str]:
    """Plain lines for ``summary.txt`` and the screen ([] without a paradigm section)."""
    if not isinstance(section, Mapping) or not section.get("name"):
        return []
    lines = [f"paradigm: {section['name']}" + (f" ({section['summary']})"
                                               if section.get("summary") else "")]
    if section.get("scope"):
        lines.append(f"  note: {section['scope']}")
    options = section.get("options") or {}
    if options:
        lines.append("  options: " + ", ".join(f"{k}={_cell(v)}" for k, v in options.items()))
    lines.extend(f"  {note}" for note in section.get("notes") or [])
    for tab in _tables(section):
        columns = [str(c) for c in tab.get("columns") or []]
        rows = [[_cell(v) for v in row] for row in tab.get("rows") or []]
        widths = [max([len(c), *(len(r[i]) for r in rows if i < len(r))])
                  for i, c in enumerate(columns)]
        lines.append(f"  {tab.get('title', '')}")
        lines.append("    " + "  ".join(c.ljust(w) for c, w in zip(columns, widths)))
        lines.extend("    " + "  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)
    return lines


def _plot(plot: Mapping[str, Any]) -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = list(plot.get("x") or [])
    for name, ys in (plot.get("series") or {}).items():
        values = [math.nan if v is None else float(v) for v in ys]
        ax.plot(xs[:len(values)] or range(1, len(values) + 1), values, marker="o", label=str(name))
    if all(isinstance(x, int) for x in xs):  # rounds: no 1.2, 1.4 ... ticks
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(str(plot.get("x_label", "")))
    ax.set_ylabel(str(plot.get("y_label", "")))
    ax.set_title(str(plot.get("title", "")))
    ax.grid(alpha=0.3)
    if plot.get("series"):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def paradigm_section_html(section: Any, img: Callable[[Any, str], str]) -> str:
    """The HTML body of the paradigm section ("" without one); ``img`` embeds a figure."""
    if not isinstance(section, Mapping) or not section.get("name"):
        return ""
    esc = html.escape
    parts = [f"<p><b>{esc(str(section['name']))}</b>"
             + (f": {esc(str(section['summary']))}" if section.get("summary") else "") + "</p>"]
    options = section.get("options") or {}
    if options:
        parts.append("<p>Settings: " + ", ".join(
            f"<code>{esc(str(k))}={esc(_cell(v))}</code>" for k, v in options.items()) + "</p>")
    parts.extend(f"<p>{esc(str(note))}</p>" for note in section.get("notes") or [])
    for tab in _tables(section):
        head = "".join(f"<th>{esc(str(c))}</th>" for c in tab.get("columns") or [])
        body = "".join("<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>"
                       for row in tab.get("rows") or [])
        parts.append(f"<h3>{esc(str(tab.get('title', '')))}</h3>"
                     f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
    plots = [p for p in section.get("plots") or [] if isinstance(p, Mapping)]
    figs = [img(_plot(p), str(p.get("title", "plot"))) for p in plots]
    if figs:
        parts.append(f'<div class="figs">{"".join(figs)}</div>')
    return "".join(parts)


def paradigm_scope_html(section: Any) -> str:
    """The paradigm's note on what the Result and Privacy sections describe ("" without)."""
    if not isinstance(section, Mapping) or not section.get("scope"):
        return ""
    return (f'<p class="warn"><b>{html.escape(str(section.get("name", "")))}:</b> '
            f"{html.escape(str(section['scope']))} See the Learning paradigm section.</p>")


def paradigm_headline(section: Any) -> Mapping[str, Any] | None:
    """The paradigm's own headline (a finite ``value``), or None: the one-model headline."""
    head = section.get("headline") if isinstance(section, Mapping) else None
    if not isinstance(head, Mapping):
        return None
    value = head.get("value")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return head


def paradigm_headline_text(section: Any) -> str | None:
    """One plain line: ``<what>: 0.812 (95% CI 0.741-0.883) on 120 test patients``."""
    head = paradigm_headline(section)
    if head is None:
        return None
    what = str(head.get("what") or f"Pooled test {head.get('metric', 'value')}")
    lower, upper = head.get("lower"), head.get("upper")
    ci = ""
    if isinstance(lower, (int, float)) and isinstance(upper, (int, float)):
        method = " DeLong" if head.get("method") == "delong" else ""
        ci = f" (95%{method} CI {_cell(float(lower))}-{_cell(float(upper))})"
    n = head.get("n")
    return (f"{what}: {_cell(float(head['value']))}{ci}"
            + (f" on {n} test patients" if n else ""))


def paradigm_headline_html(section: Any) -> str | None:
    """The Result's headline paragraph and its source sentence, or None."""
    text = paradigm_headline_text(section)
    if text is None:
        return None
    head = paradigm_headline(section) or {}
    source = (f"<p>How it was computed: {html.escape(str(head['source']))}</p>"
              if head.get("source") else "")
    return f'<p class="headline"><strong>{html.escape(text)}</strong>.</p>{source}'
