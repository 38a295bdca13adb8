"""One rounding rule for ε on every screen: up at the shown precision (a remaining budget down),
so the terminal's round line, its summary and report.html show the same figures."""

from __future__ import annotations

import pytest

from cli.console import console
from cli.run_progress import round_line
from cli.report_view import print_report
from common.privacy.display import budget_shown, epsilon_shown
from server.report_privacy import privacy_section


@pytest.mark.parametrize(("value", "decimals", "up", "down"), [
    (4.424241401342419, 2, 4.43, 4.42),
    (7.996342049274705, 3, 7.997, 7.996),
    (8.000000000000002, 2, 8.0, 8.0),  # a whole unit up to float error stays put
    (7.999999999999998, 2, 8.0, 8.0),
    (0.0, 3, 0.0, 0.0),
])
def test_epsilon_rounds_up_and_a_budget_down(value: float, decimals: int, up: float, down: float) -> None:
    assert epsilon_shown(value, decimals) == pytest.approx(up)
    assert budget_shown(value, decimals) == pytest.approx(down)


def test_the_terminal_and_the_report_show_the_same_rounded_up_epsilon() -> None:
    # the demo's figures: 4.4242 after round 1 read 4.42 in the terminal, 4.43 on the page
    train = [{"site": "site-1", "epsilon": 4.424241401342419},
             {"site": "site-2", "epsilon": 4.458812506678833}]
    doc = {
        "config": {"task": "binary", "private": True}, "status": "completed",
        "privacy": {"target_epsilon": 8.0},
        "rounds": [{"round": 1, "metrics": {"auc-pooled": 0.9, "accuracy": 0.8, "loss": 0.5},
                    "train": train}],
        "sites": [{"site": s, "num_examples": None, "epsilon": e, "epsilon_prv": e - 0.97,
                   "epsilon_dataset": e, "epsilon_cap": 8.0, "delta": 1e-5,
                   "noise_multiplier": 0.87}
                  for s, e in (("site-1", 7.996342049274705), ("site-2", 7.997572752314142))],
    }
    line = round_line({"round": 1, "metrics": {"auc-pooled": 0.9}, "train": train}, 6)
    assert "site-1 ε=4.43" in line and "site-2 ε=4.46" in line
    with console.capture() as cap:
        print_report(doc)
    screen = " ".join(cap.get().split())
    page = privacy_section(doc, lambda fig, alt: "")
    for shown in ("7.997", "7.998", "7.027"):  # RDP and PRV (7.0263 -> 7.027) spent, run and dataset
        assert shown in screen and shown in page
    assert "<td>4.43</td>" in page and "<td>4.46</td>" in page
    for understated in ("4.42", "7.996", "7.026"):
        assert understated not in line + screen + page
