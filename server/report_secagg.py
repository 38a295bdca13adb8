"""How the report states secure aggregation: ``report.json``, ``summary.txt``, ``report.html``.

``report.json["secure_aggregation"]`` (:func:`secagg_record`)::

    {"enabled": true, "mode": "auto", "hospitals": 3, "min_survivors": 3,
     "neighbours": 2,  # peers each hospital shared its secrets with (fewer than all: SecAgg+)
     "covers": [...], "not_covered": [...],
     "sessions": [{"round": 1, "phase": "train", "status": "ok", "participants": 3,
                   "survivors": 3, "threshold": 3, "dropped": [{"site": ..., "stage": ...}],
                   "reason": ...}, ...]}

``sessions`` is the secure strategy's own list, so every rewrite of the report shows the
rounds so far.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

from common.secagg.params import group_threshold, neighbour_count

__all__ = ["COVERS", "NOT_COVERED", "secagg_html", "secagg_lines", "secagg_record"]

COVERS = ("model updates", "training example counts", "training loss",
          "per-round validation score histograms", "the final test score histograms",
          "the sums the pooled-inference statistics queries release (binary metrics, "
          "placements, McNemar and calibration/logistic fits; multiclass, ordinal, "
          "multilabel, regression, segmentation), after each hospital's own release rules",
          "cross-validation fold training and k-fold held-out statistics")
NOT_COVERED = ("per-site validation and test metrics (loss, accuracy, AUC, patients)",
               "per-hospital rows and between-site meta-analyses of the pooled inference "
               "(not computed: hidden by secure aggregation)",
               "conformal, predictive-entropy and ELM-readout queries, and leave-one-site-out "
               "held-out statistics (one hospital's by design)",
               "each hospital's privacy accounting (epsilon, delta, noise multiplier), which "
               "is derived from, and so hints at, its patient count")


def secagg_record(*, enabled: bool, mode: str, hospitals: int, min_survivors: int,
                  sessions: list[dict[str, Any]], neighbours: int = 0) -> dict[str, Any]:
    """The ``report.json`` section (``sessions`` is kept by reference: it grows)."""
    out: dict[str, Any] = {"enabled": enabled, "mode": mode, "hospitals": hospitals}
    if not enabled:
        out["reason"] = ("turned off (secure-aggregation = off)" if mode == "off" else
                         f"auto: {hospitals} hospital(s), fewer than 3")
        return out
    out.update(min_survivors=min_survivors, neighbours=neighbour_count(hospitals, neighbours),
               covers=list(COVERS), not_covered=list(NOT_COVERED), sessions=sessions)
    return out


def _sharing(section: Mapping[str, Any]) -> str:
    """How the hospitals shared their secrets, in one sentence."""
    hospitals, k = section.get("hospitals"), section.get("neighbours")
    if not isinstance(hospitals, int) or not isinstance(k, int) or k >= hospitals - 1:
        return "Every hospital shared its mask secrets with every other."
    return (f"Each hospital shared its mask secrets with {k} randomly drawn neighbours, not "
            f"all {hospitals - 1} others (SecAgg+, Bell et al. 2020): its update stays hidden "
            f"unless {group_threshold(k + 1)} of its group of {k + 1} collude with the "
            "coordinator.")


def _dropped(row: Mapping[str, Any]) -> str:
    names = [f"{d.get('site')} ({d.get('stage')})" for d in row.get("dropped") or []]
    return ", ".join(names) if names else "none"


def _row_text(row: Mapping[str, Any]) -> str:
    head = f"round {row.get('round')} {row.get('phase')}"
    if row.get("status") == "abandoned":
        return f"{head}: abandoned ({row.get('reason')}); dropped: {_dropped(row)}"
    return (f"{head}: {row.get('survivors')} survivors of {row.get('participants')}; "
            f"dropped: {_dropped(row)}")


def secagg_lines(extra: Mapping[str, Any]) -> list[str]:
    """``summary.txt`` lines: whether it was on, then one line per session."""
    section = extra.get("secure_aggregation")
    if not isinstance(section, Mapping):
        return []
    if not section.get("enabled"):
        return [f"secure aggregation: off ({section.get('reason', '')})"]
    lines = [f"secure aggregation: on (minimum survivors {section.get('min_survivors')} of "
             f"{section.get('hospitals')}). {_sharing(section)}"]
    lines += [f"  {_row_text(row)}" for row in section.get("sessions") or []]
    return lines


def secagg_html(section: Any, scrub: Any = None) -> str:
    """A paragraph and a table for ``report.html`` (empty when the section is absent).

    ``scrub`` replaces node ids in text (:func:`server.report_text.scrub`).
    """
    if not isinstance(section, Mapping):
        return ""
    def clean(text: str) -> str:
        return html.escape(scrub(text) if scrub is not None else text)

    if not section.get("enabled"):
        return ("<h3>Secure aggregation</h3><p>Off: the coordinator saw each hospital's model "
                f"update ({clean(str(section.get('reason', '')))}).</p>")
    rows = "".join(
        f"<tr><td>{clean(str(r.get('round')))}</td><td>{clean(str(r.get('phase')))}</td>"
        f"<td>{clean(str(r.get('status')))}</td>"
        f"<td>{clean(str(r.get('survivors', '')))} of {clean(str(r.get('participants')))}</td>"
        f"<td>{clean(_dropped(r))}</td></tr>"
        for r in section.get("sessions") or [])
    return (
        "<h3>Secure aggregation</h3>"
        "<p>On: the coordinator saw only the sum over the hospitals of "
        f"{clean(', '.join(section.get('covers') or COVERS))}, never one hospital's "
        f"(pairwise and self masks, Bonawitz et al. 2017). {clean(_sharing(section))} "
        "A round needed at least "
        f"{clean(str(section.get('min_survivors')))} hospitals; below that it was abandoned "
        "and the model kept. Not covered: "
        f"{clean('; '.join(section.get('not_covered') or NOT_COVERED))}.</p>"
        "<table><tr><th>Round</th><th>Phase</th><th>Status</th><th>Survivors</th>"
        f"<th>Dropped (stage)</th></tr>{rows}</table>")
