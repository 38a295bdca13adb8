"""The live view of a federated run: a progress bar and one summary line per round.

The same view serves a simulation (events arrive as Python calls from the ServerApp running
in this process) and a deployment (the ServerApp runs on the SuperLink; its marker lines
arrive through ``flwr run --stream`` and :meth:`RunView.feed_line` decodes them). The bar
shows the phase, the round, how many nodes have answered and an ETA; finished rounds are
printed above it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cli.console import console, fmt
from cli.report_view import fmt_epsilon
from common import messages as k
from common.logsafe import redact
from server.progress import ProgressEvent, parse_marker, parse_round_marker

_PHASES = {"train": "training", "evaluate": "validating", "test": "final test",
           "query": "pooled statistics"}


def round_line(summary: Mapping[str, Any], total: int, *, task: str = "binary") -> str:
    """One line per finished round: validation AUC, accuracy, loss and each site's ε so far."""
    m = summary.get("metrics") or {}
    trained = sorted(summary.get("train") or [], key=lambda row: str(row.get("site")))
    eps = ", ".join(f"{row.get('site')} ε={fmt_epsilon(row.get(k.EPSILON), 2)}" for row in trained)
    # The pooled AUC when the nodes released histograms (the table and the model selection use
    # it too), else the patient-weighted mean of the sites' AUCs.
    from server.report_tasks import round_metrics, round_value

    shown = "".join(f"{name} {fmt(round_value(m, key))}  " for name, key in round_metrics(task))
    line = (f"round {summary.get('round')}/{total}: {shown}loss {fmt(m.get(k.LOSS), '.4f')}  |  "
            f"{eps or 'no site trained'}")
    for err in summary.get("errors") or []:
        site, reason = str(err.get("site")), str(err.get("reason"))
        reason = reason.removeprefix(f"[{site}] ")  # the node's own prefix, shown once
        line += f"\n  [yellow]{escape(site)} ({err.get('phase')}): {escape(reason)}[/yellow]"
    return line


class RunView:
    """Progress bar state for one run of ``num_rounds`` rounds (optionally × ``num_folds``).

    Each round counts two steps (train, validate); the final test and the pooled statistics
    count one each, per fold.
    """

    def __init__(self, progress: Progress | None, task: TaskID | None, num_rounds: int,
                 num_folds: int = 1, *, verbose: bool = False, learning_task: str = "binary") -> None:
        self._progress = progress
        self._task = task
        self.learning_task = learning_task
        self.num_rounds = num_rounds
        self.num_folds = num_folds
        self.fold = 0
        self.verbose = verbose
        self._seen: deque[str] = deque(maxlen=200)
        self.rounds_printed = 0
        self._tested = False  # deployment CV: a train phase after a final test is a new fold

    @property
    def steps_per_fold(self) -> int:
        return 2 * self.num_rounds + 2

    def _position(self, event: ProgressEvent) -> float:
        done = event.answered / event.expected if event.expected else 1.0
        if event.phase == "train":
            step = 2 * (event.round - 1)
        elif event.phase == "evaluate":
            step = 2 * (event.round - 1) + 1
        elif event.phase == "test":
            step = 2 * self.num_rounds
        else:
            step, done = 2 * self.num_rounds + 1, 0.5 * done
        return self.fold * self.steps_per_fold + max(step, 0) + done

    def on_progress(self, event: ProgressEvent) -> None:
        """A node answered (or a phase began)."""
        if event.phase == "test":
            self._tested = True
        elif event.phase == "train" and self._tested:
            self._tested = False
            self.fold = min(self.fold + 1, self.num_folds - 1)
        if self._progress is None or self._task is None:
            return
        phase = _PHASES.get(event.phase, event.phase)
        where = f"round {event.round}/{self.num_rounds} " if event.round else ""
        fold = f"fold {self.fold + 1}/{self.num_folds} " if self.num_folds > 1 else ""
        self._progress.update(
            self._task, completed=self._position(event),
            description=f"{fold}{where}{phase}: {event.answered}/{event.expected} nodes answered",
        )

    def start_fold(self, fold: int) -> None:
        """Cross-validation: fold ``fold`` (0-based) begins."""
        self.fold = fold
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=fold * self.steps_per_fold)

    def print(self, text: str) -> None:
        """Print above the bar."""
        (self._progress.console if self._progress is not None else console).print(
            text, highlight=False)

    def on_round(self, summary: Mapping[str, Any]) -> None:
        """A round finished: print its summary line."""
        self.rounds_printed += 1
        self.print(round_line(summary, self.num_rounds, task=self.learning_task))

    def feed_line(self, line: str) -> None:
        """One line of ``flwr run --stream`` output (deployment).

        Progress and round markers drive the bar; any other line is shown once (Flower can
        repeat a log line), redacted, and Flower's INFO chatter only with ``--verbose``.
        """
        text = line.rstrip("\n")
        event = parse_marker(text)
        if event is not None:
            self.on_progress(event)
            return
        summary = parse_round_marker(text)
        if summary is not None:
            self.on_round(summary)
            return
        if not text.strip() or text in self._seen:
            return
        self._seen.append(text)
        if self.verbose or not text.lstrip().startswith(("INFO", "DEBUG")):
            self.print(redact(text))


@contextmanager
def run_view(num_rounds: int, num_folds: int = 1, *, enabled: bool = True,
             verbose: bool = False, learning_task: str = "binary") -> Iterator[RunView]:
    """A :class:`RunView` with a live bar on the terminal (none when ``enabled`` is false)."""
    if not enabled:
        yield RunView(None, None, num_rounds, num_folds, verbose=verbose,
                      learning_task=learning_task)
        return
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                  TextColumn("{task.percentage:>3.0f}%"), TimeElapsedColumn(),
                  TextColumn("ETA"), TimeRemainingColumn(), console=console,
                  transient=True) as bar:
        view = RunView(bar, None, num_rounds, num_folds, verbose=verbose,
                       learning_task=learning_task)
        view._task = bar.add_task("starting the federation (loading torch, Flower, Ray)", total=view.steps_per_fold * num_folds)
        yield view
