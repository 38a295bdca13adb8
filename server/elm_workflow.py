"""DC-ELM's own workflow: one closed-form readout round instead of DP-SGD FedAvg rounds.

An extreme learning machine (Huang, Zhu and Siew, "Extreme learning machine: theory and
applications", Neurocomputing 70, 2006) keeps its hidden layers random and fixed and fits only
the output weights, by ridge regression. The zoo's ``dc-elm`` (:mod:`common.models.dcelm`)
draws two convolution layers from a fixed seed, so every hospital builds the same features
``H`` itself, and the readout is ``beta = (H^T H + ridge I)^-1 H^T Y`` with ``Y`` one-hot.
Gradient steps are not needed at all, so a ``dc-elm`` run is not FedAvg:

1. The coordinator builds the initial model from the run's seed
   (:func:`server.app.initial_arrays`) and sends it with one ``elm-readout`` query to every
   connected node (:mod:`client.queries.elm`).
2. Each node computes ``H^T H`` ``[d, d]`` and ``H^T Y`` ``[d, k]`` over its *training*
   patients and releases them under its own release rules (:mod:`client.release`).
3. The coordinator adds the sums and solves the ridge system once
   (:func:`server.inference.federated_elm_readout`), puts ``beta`` into the readout, and
   evaluates the model as a DP-SGD run's final model is evaluated: validation metrics (the
   round table), the final test evaluation (``final``) and the pooled binary or multi-class
   inference (``inference``: AUC, operating point, sensitivity, specificity).

"Federated" here means one round and sums only: no image, feature row or per-patient value
leaves a hospital, and because both statistics are sums over samples, the pooled solve equals
the ridge fit on all hospitals' rows together (exactly, without noise; test
``tests/server/test_elm_readout.py``). Nothing is iterated, so there is no model selection
over rounds: the single readout is the final model (``checkpoints/round-1.pt`` =
``checkpoints/final.pt``).

Differential privacy (patient level, at each hospital)
    Each patient's feature rows are scaled so that the sum of their L2 norms is at most
    ``clip`` (:func:`common.models.dcelm.readout_row_scale`; the constant bias feature is
    part of the row). Adding or removing one patient then changes ``H^T H`` by at most
    ``clip**2`` and ``H^T Y`` by at most ``clip`` in Frobenius norm (labels one-hot). A node
    with ``stats-noise-multiplier = m > 0`` adds independent Gaussian noise of standard
    deviation ``m * clip**2`` to every entry of ``H^T H`` and ``m * clip`` to every entry of
    ``H^T Y``: two Gaussian mechanisms that compose (Gaussian DP) to one with noise multiplier
    ``m / sqrt(2)``, sampling rate 1, one step. The node checks that charge against its
    epsilon cap before reading any image and appends it to its signed ledger (release
    ``query:elm-readout``) before the sums leave; its reply carries the dataset's epsilon
    after the charge, which this report shows per site. That value is the dataset's total
    over every run (``epsilon_dataset``); for a dataset with no earlier patient-level release
    it is this run's epsilon, otherwise an upper bound on it. A node that does not noise
    (``m = 0``) refuses a private plan outright and releases exact sums only for a
    non-private plan it consents to (``allow-non-private``), recorded at level ``"exact"``.
    The coordinator symmetrises the noised ``H^T H`` and raises the ridge above its most
    negative eigenvalue (post-processing, no privacy cost). Validation and test metrics are
    exact releases, as in a DP-SGD run (not covered by epsilon).

Privacy caveats: the coordinator cannot see each node's noise multiplier or delta (the query
reply carries only epsilon), so the report's per-site delta and sigma are left blank; the
number of training patients is not released (the row count's sensitivity is unbounded).
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from server.progress import DelegatingGrid, ProgressCallback
from server.transport import with_transport
from server.report import RunReport
from server.strategies.fedavg import RoundLog, VesaliusFedAvg

__all__ = ["DEFAULT_CLIP", "DEFAULT_RIDGE", "WORKFLOW", "run_elm_workflow"]

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundLog], None]

WORKFLOW = "elm-readout"
"""Name of this workflow in ``report.json`` (``workflow.name``)."""

DEFAULT_RIDGE = 0.1
"""Ridge ``lambda`` added to ``sum H^T H`` (rows have norm <= ``clip``; scales as ``clip**2``)."""

DEFAULT_CLIP = 1.0
"""Per-patient bound on the sum of a patient's feature-row norms (the DP sensitivity unit)."""

_NODE_WAIT_POLL_S = 1.0


class _RecordingGrid(DelegatingGrid):
    """A Grid that keeps every reply passing through (the readout's per-node details)."""

    def __init__(self, inner: Grid) -> None:
        super().__init__(inner)
        self.replies: list[Message] = []

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        replies = list(self._inner.send_and_receive(messages, timeout=timeout))
        self.replies.extend(replies)
        return replies


def _with_run_id(config: RunConfig) -> RunConfig:
    """The config with a run id that never repeats (nodes record it in their ledgers)."""
    if config.plan.run_id:
        return config
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    return dataclasses.replace(config, plan=dataclasses.replace(config.plan, run_id=run_id))


def _connected_nodes(grid: Grid, *, min_nodes: int, timeout: float) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected (or whatever is there at ``timeout``)."""
    deadline = time.monotonic() + timeout
    ids = [int(n) for n in grid.get_node_ids()]
    while len(ids) < min_nodes and time.monotonic() < deadline:
        time.sleep(_NODE_WAIT_POLL_S)
        ids = [int(n) for n in grid.get_node_ids()]
    return ids


def _privacy_section(config: RunConfig) -> dict[str, Any]:
    """``report.json``'s ``privacy`` for this workflow (it replaces the DP-SGD description)."""
    if not config.plan.private:
        return {"unit": "patient", "guarantee": "none (non-private baseline)",
                "mechanism": "none (non-private baseline): exact H^T H and H^T Y",
                "target_epsilon": None, "max_grad_norm": None, "hospital_level": None}
    return {
        "unit": "patient (not image): each patient's feature rows are clipped together",
        "guarantee": "patient-level (epsilon, delta)-DP at each hospital, for its own patients",
        "training": "Training was one release (no DP-SGD): the Gaussian mechanism on the "
        "clipped sufficient statistics H^T H and H^T Y of the DC-ELM readout, each patient's "
        "feature rows clipped together; its noise is set by the plan like DP-SGD's (the plan's "
        "noise multiplier, or the one meeting the plan's target epsilon in one release) and "
        "charged to each hospital's ledger as one Gaussian step",
        "mechanism": "Gaussian mechanism on the clipped sufficient statistics H^T H and H^T Y "
        "of the DC-ELM readout, released once (no DP-SGD)",
        "accountants": "each node's ledger accountant (RDP) for the charge; epsilon is the "
        "dataset's epsilon after the readout release",
        "target_epsilon": config.plan.target_epsilon,
        "max_grad_norm": None,
        "scope": "epsilon: the dataset's total after the readout release (this run's epsilon "
        "when the dataset had no earlier patient-level release, else an upper bound on it)",
        "hospital_level": None,
        "not_covered": "exact releases (validation and test metrics; test statistics unless "
        "the node sets stats-noise-multiplier) carry no DP guarantee: they are on each node's "
        "ledger at level 'exact', refused below its minimum release count, with small cells "
        "suppressed",
    }


def _readout_round(replies: list[Message], node_ids: list[int]) -> RoundLog:
    """Round 1 as the report shows it: the readout replies as the round's "train" releases.

    Each site's row carries what its reply said: ``noised`` and, for a noised release, the
    dataset's ``epsilon`` after it (also as ``epsilon-dataset``). Errors and refusals are
    recorded as a training round's are.
    """
    entry = RoundLog(round=1)
    VesaliusFedAvg._record(entry, replies, node_ids, train=True)  # noqa: SLF001 - same layout
    for row in entry.errors:
        row["phase"] = "readout"
    for reply in entry.train:
        for key in (k.ELM_HTH, k.ELM_HTY):
            reply.metrics.pop(key, None)
        if k.EPSILON in reply.metrics:
            reply.metrics[k.EPSILON_DATASET] = reply.metrics[k.EPSILON]
    return entry


def _workflow_section(summary: dict[str, Any], entry: RoundLog, ridge: float) -> dict[str, Any]:
    """``report.json``'s ``workflow``: what was pooled and how the readout was solved."""
    noised = [r.site for r in entry.train if r.metrics.get(k.NOISED)]
    return {
        "name": WORKFLOW,
        "model": "dc-elm (Huang et al. 2006 extreme learning machine; random seeded "
        "convolutional features, closed-form ridge readout)",
        "rounds": 1,
        "nodes": len(summary.get("sites", [])),
        "sites": list(summary.get("sites", [])),
        "features": summary.get("features"),
        "pooled": ["H^T H", "H^T Y"],
        "ridge": ridge,
        "ridge_used": summary.get("ridge_used"),
        "min_eigenvalue": summary.get("min_eigenvalue"),
        "clip": summary.get("clip"),
        "noised": bool(summary.get("noised", False)),
        "noised_sites": noised,
        "exact_sites": [r.site for r in entry.train if r.site not in noised],
        "status": summary.get("status"),
        "reason": summary.get("reason", ""),
        "failures": summary.get("failures", []),
    }


def run_elm_workflow(
    grid: Grid,
    config: RunConfig,
    *,
    on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
    ridge: float = DEFAULT_RIDGE,
    clip: float = DEFAULT_CLIP,
) -> RunReport:
    """Fit a ``dc-elm`` run's readout in one federated closed-form round; write its report.

    Phases (see the module docstring): readout query to every connected node, pooled ridge
    solve, validation evaluation (the round table), final test evaluation, pooled inference.
    ``report.json``, ``summary.txt`` and ``report.html`` are written as
    :func:`server.app.run_federation` writes them, with ``workflow`` describing the readout.

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The running ServerApp's grid (or a stand-in with ``get_node_ids`` and
        ``send_and_receive``).
    config : RunConfig
        The run; ``plan.model`` must be an ELM-family model. ``num-server-rounds``,
        ``local-epochs``, ``batch-size`` and ``learning-rate`` do not apply.
    on_round : callable, optional
        Called with round 1's :class:`~server.strategies.fedavg.RoundLog` once its validation
        metrics are in.
    on_progress : callable, optional
        Hears of every reply as it arrives (:mod:`server.progress`).
    ridge : float, optional, keyword-only
        Requested ridge; with noised sums the solve raises it above the noise
        (:func:`server.inference.federated_elm_readout`).
    clip : float, optional, keyword-only
        Per-patient L2 bound of the feature rows (the DP sensitivity unit).

    Returns
    -------
    RunReport
        ``status`` "completed", "incomplete" (no final test metrics), "stopped" (a node
        refused and ``on-refusal = "stop"``) or "failed", with a reason.
    """
    from server.app import final_inference, initial_arrays
    from server.inference import federated_elm_readout
    from server.report_html import write_report_html

    config = _with_run_id(config)
    out_dir = Path(config.out_dir)
    report = RunReport(config=config)
    report.extra["privacy"] = _privacy_section(config)
    strategy = VesaliusFedAvg(on_refusal=config.on_refusal, min_available_nodes=config.min_nodes)
    report.excluded = strategy.excluded
    progress_grid = with_transport(grid, on_progress)
    recorder = _RecordingGrid(progress_grid)
    plan_record = config.plan.to_record()
    try:
        if config.hospital_dp_noise > 0:
            raise _Refused("failed", "hospital-level DP (hospital-dp-noise) is not implemented "
                           "for the DC-ELM closed-form workflow; run without it")
        arrays0 = initial_arrays(config)
        node_ids = _connected_nodes(grid, min_nodes=config.min_nodes,
                                    timeout=config.round_timeout)
        if len(node_ids) < config.min_nodes:
            raise _Refused("failed", f"{len(node_ids)} node(s) connected, fewer than "
                           f"min-nodes={config.min_nodes}")
        arrays, summary = federated_elm_readout(
            recorder, node_ids, arrays0, config.plan, ridge=ridge, clip=clip,
            timeout=config.round_timeout)
        entry = _readout_round(recorder.replies, node_ids)
        report.rounds.append(entry)
        report.extra["workflow"] = _workflow_section(summary, entry, ridge)
        for row in entry.refusals:
            strategy.excluded[int(cast(int, row["node_id"]))] = str(row["reason"])
        report.write(out_dir)
        if entry.refusals and config.on_refusal == "stop":
            reasons = "; ".join(f"{r['site']}: {r['reason']}" for r in entry.refusals)
            raise _Refused("stopped", f"round 1: a node refused the readout ({reasons})")
        if arrays is None:
            raise _Refused("failed", "no node released its readout statistics (see the "
                           "errors of round 1)")
        _save(arrays, out_dir / "checkpoints", "round-1.pt", "final.pt")
        report.extra["model_selection"] = {
            "final_round": 1, "selection": "closed-form readout (one round, no selection)",
            "checkpoint": "checkpoints/round-1.pt"}
        val = strategy.evaluate_everywhere(
            progress_grid, arrays,
            ConfigRecord({**plan_record, k.SPLIT: k.SPLIT_VAL, k.WITH_HISTOGRAMS: True}),
            timeout=config.round_timeout)
        entry.evaluate, entry.evaluate_metrics = val.evaluate, val.evaluate_metrics
        entry.errors.extend(val.errors)
        report.write(out_dir)
        if on_round is not None:
            on_round(entry)
        report.final = strategy.evaluate_everywhere(
            progress_grid, arrays,
            ConfigRecord({**plan_record, k.SPLIT: k.SPLIT_TEST, k.WITH_HISTOGRAMS: True}),
            timeout=config.round_timeout)
        answered = [n for n in node_ids if n not in strategy.excluded]
        report.extra["inference"] = final_inference(progress_grid, arrays, config, answered)
        if report.final.evaluate_metrics:
            report.status = "completed"
            if strategy.excluded:
                report.reason = (f"{len(strategy.excluded)} node(s) refused the readout and "
                                 "were left out of it (see 'excluded')")
        else:
            report.status = "incomplete"
            report.reason = "no node returned final test metrics (see final.errors)"
    except _Refused as exc:
        report.status, report.reason = exc.status, exc.reason
        log.warning("elm-readout run %s: %s", exc.status, exc.reason)
    except BaseException as exc:
        report.status = "failed"
        report.reason = f"{type(exc).__name__}: {exc}"
        report.write(out_dir)
        raise
    report.write(out_dir)
    write_report_html(report.to_dict(), out_dir / "report.html")
    log.info("run finished: %s", report.summary())
    return report


class _Refused(Exception):
    """Ends the workflow early with a report status and reason (not an error of the code)."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _save(arrays: ArrayRecord, directory: Path, *names: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    state = arrays.to_torch_state_dict()
    for name in names:
        torch.save(state, directory / name)
