"""The paradigm section: the same content on the screen, in summary.txt and in report.html."""

from __future__ import annotations

import json
from pathlib import Path

from common.config import RunConfig, TrainPlan
from server.report import RunReport
from server.report_html import write_report_html
from server.report_paradigm import paradigm_headline_text, paradigm_lines

SECTION = {
    "name": "transfer", "summary": "pretrained encoder, fine-tuned",
    "options": {"freeze": "trunk"},
    "scope": "the Result is the transfer arm's & the Privacy section its fine-tuning run's",
    "notes": ["Both arms spent the same ε at every hospital."],
    "tables": [{"title": "Transfer vs scratch", "columns": ["arm", "test AUC", "ε"],
                "rows": [["scratch", 0.7123, 7.99], ["transfer <b>", 0.8, None]]}],
    "plots": [{"title": "validation AUC", "x_label": "round", "y_label": "AUC", "x": [1, 2],
               "series": {"scratch": [0.6, 0.7], "transfer": [0.7, None]}}],
}


def test_lines_show_options_notes_and_table_rows() -> None:
    lines = paradigm_lines(SECTION)
    assert lines[0] == "paradigm: transfer (pretrained encoder, fine-tuned)"
    assert "  options: freeze=trunk" in lines
    assert lines[1].startswith("  note: the Result is the transfer arm's")
    assert any("scratch" in line and "0.712" in line and "7.990" in line for line in lines)
    assert any("transfer <b>" in line and "–" in line for line in lines)
    assert paradigm_lines(None) == [] and paradigm_lines({"tables": []}) == []


def test_summary_and_html_carry_the_section(tmp_path: Path) -> None:
    report = RunReport(config=RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path)))
    report.extra["paradigm"] = SECTION
    report.write(tmp_path)
    assert "paradigm: transfer" in (tmp_path / "summary.txt").read_text()
    doc = json.loads((tmp_path / "report.json").read_text())
    assert doc["paradigm"]["name"] == "transfer"
    page = write_report_html(doc, tmp_path / "report.html")
    assert page is not None
    text = page.read_text()
    assert 'id="paradigm"' in text and "Learning paradigm" in text
    assert "transfer &lt;b&gt;" in text and "<b>transfer <b>" not in text  # escaped
    assert "0.712" in text and "data:image/png;base64," in text
    # the scope note comes first, above the Result, escaped
    assert text.index('class="warn"') < text.index('id="result"')
    assert "&amp; the Privacy" in text


def test_a_paradigm_headline_replaces_the_one_model_headline(tmp_path: Path) -> None:
    # Prepare: an ensemble's section with its own pooled AUC
    head = {"metric": "AUC", "value": 0.8123, "lower": 0.75, "upper": 0.87, "n": 120,
            "method": "delong", "what": "Pooled test AUC of the ensemble (3 members, average)",
            "source": "summed <bins>"}
    report = RunReport(config=RunConfig(plan=TrainPlan(num_rounds=1), out_dir=str(tmp_path)))
    report.extra["paradigm"] = {**SECTION, "name": "ensemble", "headline": head}
    # Execute
    report.write(tmp_path)
    doc = json.loads((tmp_path / "report.json").read_text())
    page = write_report_html(doc, tmp_path / "report.html")
    # Assert: summary.txt, report.json and the page lead with the ensemble's figure
    line = "Pooled test AUC of the ensemble (3 members, average): 0.812 (95% DeLong CI " \
           "0.750-0.870) on 120 test patients"
    assert line in (tmp_path / "summary.txt").read_text().splitlines()
    assert doc["paradigm"]["headline"]["value"] == 0.8123
    assert page is not None
    text = page.read_text()
    result = text[text.index('id="result"'):text.index('id="paradigm"')]
    assert "0.812" in result and "summed &lt;bins&gt;" in result
    assert "No pooled AUC is available" not in result
    # a headline without a finite value is ignored: the one-model headline stays
    assert paradigm_headline_text({"headline": {"value": None}}) is None
