"""The one sanitiser for logs and warnings: no quoted value, UID, path or person name survives."""

from __future__ import annotations

import logging
import warnings

import pytest

from common.logsafe import install_log_sanitiser, redact


@pytest.mark.parametrize(
    ("text", "gone"),
    [
        ("Invalid value for VR UI: '05fa52f0e1b2'", "05fa52f0e1b2"),
        ('The value "SMITH" is not valid', "SMITH"),
        ("SOP Instance UID 1.2.826.0.1.3680043.8.498.1234567 seen twice", "1.2.826.0.1.3680043"),
        ("cannot read /srv/hospital/site-1/series/0001.dcm", "/srv/hospital"),
        ("cannot read ~/data/0001.dcm", "~/data"),
        ("Patient's Name Doe^Jane^^Dr", "Doe^Jane"),
        ("medical record 004512398", "004512398"),
    ],
)
def test_redact_removes_identifying_shapes(text: str, gone: str) -> None:
    assert gone not in redact(text)


@pytest.mark.parametrize(
    "text",
    ["the node's data and the hospital's epsilon cap", "round 3/5, ε/round 0.8",
     "SuperLink at 127.0.0.1:9092", "AUC 0.951 (0.912-0.973)", "model densenet, 12 files"],
)
def test_redact_keeps_ordinary_sentences(text: str) -> None:
    assert redact(text) == text


def test_installed_sanitiser_filters_log_records_and_warnings() -> None:
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    target = logging.getLogger("py.warnings")  # where captured warnings are logged
    target.addHandler(handler)
    logging.captureWarnings(False)  # pytest restores warnings.showwarning between tests
    try:
        install_log_sanitiser(target)
        target.warning("Invalid value for VR UI: '%s'", "05fa52f0e1b2")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("Invalid value for VR DA: '19700101'", UserWarning, stacklevel=1)
    finally:
        target.removeHandler(handler)
        logging.captureWarnings(False)
    joined = "\n".join(records)
    assert "Invalid value for VR UI" in joined and "Invalid value for VR DA" in joined
    assert "05fa52f0e1b2" not in joined and "19700101" not in joined
