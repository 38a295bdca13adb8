"""report.html for people: sections, plain privacy sentences, one headline AUC, no internal keys.

Fast tests (no browser): the page is parsed with :mod:`html.parser`. The browser test is in
``test_report_chromium.py``.
"""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from common.config import RunConfig, TrainPlan
from server.report import RunReport
from server.report_html import SECTION_IDS, build_html, render_report_html
from server.report_text import fmt_epsilon
from server.strategies.fedavg import RoundLog, SiteReply
from tests.server.report_fixtures import NODE_IDS, SITES, cv_report, run_report

RUN_SECTIONS = ("result", "privacy", "training", "performance", "figures", "sites",
                "heterogeneity", "problems", "configuration")
INTERNAL_WORDS = ("loglik", "noised", "epsilon_prv", "epsilon_dataset", "ledger_heads",
                  "auc_note", "metrics_note", "unit-weight", "num-examples", "auc_mean",
                  "auc_sd", "node_id", "suppressed_cells", "train-loss", "auc-pooled")


class Page(HTMLParser):
    """Sections (id -> heading), visible text, tables by class, images, attribute values."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.sections: dict[str, str] = {}
        self.text: list[str] = []
        self.images: list[str] = []
        self.attrs: list[str] = []
        self.tables: dict[str, list[list[str]]] = {}
        self._section: str | None = None
        self._in: list[str] = []
        self._table: str | None = None
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self._in.append(tag)
        self.attrs += [v for k, v in attrs if v is not None and k != "src"]
        if tag == "section":
            self._section = a.get("id")
        elif tag == "img":
            self.images.append(a.get("src") or "")
        elif tag == "table":
            self._table = (a.get("class") or "").split(" ")[0] or None
            if self._table:
                self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if self._in and self._in[-1] == tag:
            self._in.pop()
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None and self._table:
            self.tables[self._table].append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if "style" in self._in or "title" in self._in:
            return
        self.text.append(data)
        if self._in and self._in[-1] == "h2" and self._section:
            self.sections[self._section] = self.sections.get(self._section, "") + data
        if self._cell is not None:
            self._cell.append(data)

    @property
    def visible(self) -> str:
        return re.sub(r"\s+", " ", "".join(self.text))


def _page(report: dict[str, Any]) -> Page:
    return Page(build_html(report))


def test_every_section_of_a_run_renders_with_its_heading() -> None:
    # Prepare
    report = run_report()
    # Execute
    page = _page(report)
    # Assert
    for key in RUN_SECTIONS:
        assert page.sections.get(key) == SECTION_IDS[key], key
    assert "could not be rendered" not in page.visible
    # privacy (ε plot), training curves, ROC, calibration, AUC forest plot
    assert len(page.images) == 5
    for src in page.images:
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        image.load()
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_no_internal_key_no_node_id_no_empty_reason_row() -> None:
    # Prepare
    report = run_report()
    # Execute
    page = _page(report)
    # Assert
    shown = page.visible + " " + " ".join(page.attrs)
    for word in INTERNAL_WORDS:
        assert word not in shown, word
    assert not re.search(r"\d{15,}", shown)
    assert not re.search(r"node-\d", shown)
    assert "{" not in page.visible and "'" + "site" not in page.visible  # no dict dumps
    for rows in page.tables.values():
        for row in rows:
            assert not (row and row[0].lower() == "reason"), row


def test_refusing_nodes_are_named_by_site_or_as_unnamed() -> None:
    # Prepare
    report = run_report()
    # Execute
    problems = _page(report).tables
    text = build_html(report)
    # Assert
    assert "site-3</td><td>refused: over cap" in text  # prefix turned into the site name
    assert "an unnamed node</td><td>refused: over cap" in text  # no prefix, no name
    assert "an unnamed node</td><td>no reply within the round timeout" in text
    assert "site-2</td><td>refused: budget" in text
    assert problems  # tables were parsed


def test_epsilon_on_the_page_matches_report_json() -> None:
    # Prepare
    report = run_report()
    # Execute
    page = _page(report)
    # Assert: ε after each round, per site
    rows = page.tables["epsilon-rounds"]
    assert rows[0] == ["Round", *[f"ε {s}" for s in SITES]]
    for row in rows[1:]:
        entry = next(e for e in report["rounds"] if e["round"] == int(row[0]))
        by_site = {t["site"]: t["epsilon"] for t in entry["train"]}
        assert row[1:] == [fmt_epsilon(by_site[s]) for s in SITES]
    # ... and the per-site table: ε (RDP), ε (PRV), dataset ε, cap, δ, σ
    table = page.tables["privacy-sites"]
    head = table[0]
    for row in table[1:]:
        site = next(s for s in report["sites"] if s["site"] == row[0])
        for key, col in (("epsilon", "ε this run (RDP)"), ("epsilon_prv", "ε this run (PRV)"),
                         ("epsilon_dataset", "ε dataset total (all runs)"),
                         ("epsilon_cap", "ε cap"), ("noise_multiplier", "Noise multiplier σ")):
            assert float(row[head.index(col)]) == pytest.approx(site[key], rel=5e-4)
        assert row[head.index("δ")] == "1e-5"
    heads = page.tables["ledger-heads"]
    assert {r[0]: r[1] for r in heads[1:]} == {s["site"]: s["ledger_head"]
                                               for s in report["sites"]}


def test_privacy_sentences_for_a_review_board() -> None:
    # Prepare
    report = run_report()
    # Execute
    text = _page(report).visible
    # Assert: sites differ in ε, so each is named with its own guarantee
    assert "protected by differential privacy at the patient level for this run" in text
    assert "site-1: (ε = 8.00, δ = 1e-5)" in text and "site-3: (ε = 6.25, δ = 1e-5)" in text
    assert "The unit of privacy is the patient" in text
    assert "σ = 0.949" in text and "norm of at most 1" in text
    assert "has spent ε = 8.00 of its cap of 10" in text
    assert "Rényi-DP (RDP) accountant" in text and "PRV accountant" in text
    assert "Hospital-level differential privacy" in text and "ε = 3.21, δ = 0.001" in text
    # one site spending the same as all others gives one sentence
    same = run_report()
    for row in same["sites"]:
        row["epsilon"] = 7.9965921572875835
    assert ("Each hospital's patients are protected by (ε = 8.00, δ = 1e-5)-differential "
            "privacy at the patient level for this run.") in _page(same).visible


def test_one_headline_auc_and_the_others_labelled() -> None:
    # Prepare
    report = run_report()
    # Execute
    text = _page(report).visible
    # Assert
    assert re.search(r"Pooled test AUC:\s+0\.951\s+\(95% DeLong CI 0\.93–0\.97\) on 360 test "
                     r"patients from 3 hospitals", text)
    assert "How it was pooled" in text
    assert "0.9506" in text and "1,000 equal-width bins" in text
    assert "a different estimand: the AUC of an average hospital" in text
    assert "weighted by their patients" in text


def test_operating_point_calibration_and_selection_render() -> None:
    # Prepare
    report = run_report()
    # Execute
    text = _page(report).visible
    # Assert
    assert "at least 0.432" in text and "Youden's J" in text and "T = 1.25" in text
    assert "Before recalibration" in text and "After" in text
    assert "after round 2 of 2, chosen by best validation AUC (0.93)" in text


def test_optional_parts_may_be_absent() -> None:
    # Prepare: a run that failed before any round, a report without privacy, a non-private run
    failed = {"status": "failed", "reason": "no node trained in any round", "rounds": [],
              "sites": [], "privacy": {"target_epsilon": 8.0}}
    baseline = run_report()
    baseline["privacy"]["guarantee"] = "none (non-private baseline)"
    # Execute
    pages = [_page(failed), _page({"status": "running"}), _page(baseline)]
    # Assert
    assert "no node trained in any round" in pages[0].visible
    assert "No pooled AUC is available" in pages[1].visible
    assert "trained without differential privacy" in pages[2].visible
    for page in pages:
        assert "could not be rendered" not in page.visible
        assert "result" in page.sections


def test_cross_validation_page() -> None:
    # Prepare
    report = cv_report()
    # Execute
    page = _page(report)
    # Assert
    for key in ("result", "privacy", "figures", "cv", "configuration"):
        assert page.sections.get(key) == SECTION_IDS[key], key
    assert "Pooled held-out AUC over all folds: 0.81" in page.visible
    assert "for the whole cross-validation" in page.visible
    assert page.tables["epsilon-rounds"][0][0] == "Fold"
    assert [r[1] for r in page.tables["epsilon-rounds"][1:]] == ["5.79", "8.00"]
    for word in ("auc_mean", "/tmp/x", "source"):
        assert word not in page.visible


def test_report_written_from_a_run_names_excluded_sites(tmp_path: Path) -> None:
    # Prepare: node 12 refused in round 1 with its site prefix
    cfg = RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path))
    entry = RoundLog(round=1, train=[SiteReply("site-1", 11, {"epsilon": 1.0})])
    entry.refusals.append({"site": "site-9", "node_id": 12, "phase": "train",
                           "reason": "[site-9] refused: over cap"})
    report = RunReport(config=cfg, rounds=[entry], excluded={12: "[site-9] refused: over cap",
                                                            13: "refused"})
    # Execute
    doc = json.loads(report.write(tmp_path).read_text())
    path = render_report_html(doc, tmp_path / "report.html")
    # Assert
    assert doc["excluded"][0] == {"node_id": 12, "site": "site-9",
                                  "reason": "[site-9] refused: over cap"}
    assert "site" not in doc["excluded"][1]
    text = path.read_text(encoding="utf-8")
    assert "site-9</td><td>refused: over cap" in text and ">12<" not in text
    assert "excluded site-9:" in (tmp_path / "summary.txt").read_text()
    assert str(NODE_IDS[0]) not in text


def test_a_multiclass_run_leads_with_its_macro_auc() -> None:
    # Prepare: a binary fixture turned into a multi-class report (the pooled section's schema)
    report = run_report()
    inf = report["inference"]
    for key in ("metrics", "auc", "meta", "operating_point"):
        inf.pop(key, None)
    report.pop("final", None)
    inf["task"] = "multiclass"
    inf["n"] = 120
    inf["multiclass"] = {
        "auc": {"macro": {"value": 0.8123, "lower": 0.7611, "upper": 0.8635, "n": 120,
                          "method": "delong"}},
        "accuracy": {"value": 0.7, "lower": 0.61, "upper": 0.77, "n": 120, "method": "wilson"},
        "balanced_accuracy": {"value": 0.66, "lower": 0.58, "upper": 0.74, "n": 120,
                              "method": "wald"},
    }
    # Execute
    page = _page(report)
    # Assert
    assert "Pooled test macro one-vs-rest AUC: 0.812 (95% CI 0.761–0.864) on 120" in page.visible
    assert "accuracy 0.7, balanced accuracy 0.66" in page.visible
    assert "No pooled AUC is available" not in page.visible
