"""report.html in a real browser: headless Chromium loads the page, decodes every figure, and
every section's heading is in the DOM after load.

Skipped with a reason where Chromium is not installed, except in CI (``CI=true``), where it
must be (``.ci/run`` installs Debian's ``chromium``) and its absence fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from server.report_html import SECTION_IDS, render_report_html
from tests.server.report_fixtures import cv_report, run_report
from tests.server.test_report_page import RUN_SECTIONS, Page

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# Appended to a copy of the page only: after load, record what the browser decoded.
PROBE = ("<script>window.addEventListener('load',()=>{document.body.dataset.images="
         "JSON.stringify(Array.from(document.images).map(i=>[i.complete,i.naturalWidth,"
         "i.naturalHeight,i.width,i.height]));});</script>")


def _chromium() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail("Chromium is required in CI (apt-get install -y chromium in .ci/run)")
    pytest.skip("Chromium is not installed (Debian: apt-get install -y chromium)")


def _run(browser: str, *args: str, home: Path) -> subprocess.CompletedProcess[str]:
    cmd = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           "--no-first-run", "--disable-extensions", f"--user-data-dir={home / 'profile'}",
           *args]
    env = {**os.environ, "HOME": str(home)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env,
                          check=False)


def _dom(browser: str, page: Path, home: Path) -> str:
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    res = _run(browser, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri(), home=home)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _decoded(dom: str) -> list[list[Any]]:
    import html

    start = dom.index('data-images="') + len('data-images="')
    return list(json.loads(html.unescape(dom[start:dom.index('"', start)])))


@pytest.mark.parametrize(("make", "sections", "figures"), [
    (run_report, RUN_SECTIONS, 5),
    (cv_report, ("result", "privacy", "figures", "cv", "configuration"), 2),
], ids=["run", "cross-validation"])
def test_chromium_renders_every_section_and_figure(
    tmp_path: Path, make: Any, sections: tuple[str, ...], figures: int
) -> None:
    # Prepare
    browser = _chromium()
    page = render_report_html(make(), tmp_path / "report.html")
    # Execute
    dom = _dom(browser, page, tmp_path)
    shot = tmp_path / "page.png"
    res = _run(browser, "--window-size=1280,4000", f"--screenshot={shot}", page.as_uri(),
               home=tmp_path)
    # Assert: headings in the DOM after load
    parsed = Page(dom)
    for key in sections:
        assert parsed.sections.get(key) == SECTION_IDS[key], key
    assert "could not be rendered" not in parsed.visible
    # every <img> decoded by the browser, with a non-zero size
    images = _decoded(dom)
    assert len(images) == figures
    for complete, natural_w, natural_h, w, h in images:
        assert complete and natural_w > 0 and natural_h > 0 and w > 0 and h > 0
    # and the page paints: a screenshot that is not blank
    from PIL import Image

    assert res.returncode == 0, res.stderr[-2000:]
    with Image.open(shot) as im:
        assert im.size == (1280, 4000)
        lo, hi = im.convert("L").getextrema()
        assert hi - lo > 100
