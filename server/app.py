"""The coordinator's Flower ServerApp: parse config, run FedAvg, write the report.

Per round: every sampled node trains with DP-SGD on its own data, FedAvg aggregates the
weights, every node evaluates the new global model on its validation split, and the global
model is checkpointed. After the last round the final model is the checkpoint of the round
with the best pooled validation AUC (:mod:`server.final_model`); the nodes evaluate it on
their test splits and release per-class score histograms, from which the pooled test AUC is
computed, and answer the statistics queries that calibrate it and choose its operating point
on validation and report its test metrics there.
``report.json`` and ``summary.txt`` are rewritten after every round, so a crash loses nothing
that was already learned.

The run's task (``task``, ``num-classes``; :mod:`common.tasks.federated`) sets the model's
outputs and the final inference: the binary path above, or for ``multiclass`` the pooled
confusion matrix and one-vs-rest AUCs at the arg-max class
(:func:`server.inference_multiclass.multiclass_inference`: no recalibration, no threshold).
``report.json`` records ``config.task``/``num-classes`` and ``inference.task``.
"""

from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context
from flwr.serverapp import Grid, ServerApp

from common import messages as k
from common.config import RunConfig
from common.models import build_model
from common.models.registry import get_spec
from common.paradigms import get_paradigm, load_path
from common.tasks.federated import federated_task, plan_samples, spatial_dims
from server import resume as run_records
from server.cv import CVSpec, run_cross_validation, secure_enabled
from server.progress import ProgressCallback, emit_marker, emit_round_marker
from server.report import RunReport, round_dict
from server.transport import with_transport
from server.strategies.fedavg import RoundLog, RunStopped, VesaliusFedAvg
from server.strategies.hospital_dp import HospitalLevelDP
from server.strategies.secure import SecureFedAvg
from common.secagg.params import threshold as secagg_threshold
from server.report_secagg import secagg_record

log = logging.getLogger(__name__)

RoundCallback = Callable[[RoundLog], None]


def initial_model(config: RunConfig) -> tuple[torch.nn.Module, dict[str, Any] | None]:
    """The global model before round 1, seeded by the run config, and how it was initialised.

    It has ``task.num_outputs(num-classes)`` outputs and the plan's sample dimensionality; a
    task, model or sample kind a federation cannot train is refused
    (:class:`~common.errors.ConfigError`) before any node is asked. With ``init-from`` the
    checkpoint's tensors of matching name and shape replace the seeded ones
    (:func:`common.models.transfer.init_from`); the second value then records the file's
    SHA-256 and what was loaded (``report.json``'s ``init_from``), else it is None.
    """
    plan = config.plan
    task = federated_task(plan.task, plan.model)
    plan_samples(task, plan.model, plan.samples)
    outputs = task.num_outputs(plan.num_classes)
    torch.manual_seed(plan.seed)
    model = build_model(plan.model, in_channels=1, num_classes=outputs,
                        image_size=plan.image_size, spatial_dims=spatial_dims(plan.samples))
    if not config.init_from:
        return model, None
    from common.models.transfer import init_from

    loaded = init_from(model, config.init_from)
    return model, {"checkpoint": Path(config.init_from).name, "sha256": loaded.sha256,
                   "tensors_loaded": loaded.num_loaded, "tensors_skipped": loaded.num_skipped,
                   "kept_from_seed": list(loaded.kept)}


def initial_arrays(config: RunConfig) -> ArrayRecord:
    """The weights of :func:`initial_model`."""
    return ArrayRecord(initial_model(config)[0].state_dict())


def run_federation(
    grid: Grid, config: RunConfig, *, on_round: RoundCallback | None = None,
    on_progress: ProgressCallback | None = None,
) -> RunReport:
    """Run the whole federation on ``grid`` and return (and write) its report.

    The report is rewritten after every training and every evaluation phase, so whatever a
    crash interrupts, what the nodes already released (their epsilon included) is on disk.
    ``on_progress`` hears of every reply as it arrives (:mod:`server.progress`).
    """
    if get_spec(config.plan.model).family == "elm":  # closed-form readout, not SGD rounds
        from server.elm_workflow import run_elm_workflow

        return run_elm_workflow(grid, config, on_round=on_round, on_progress=on_progress)
    paradigm = get_paradigm(config.plan.paradigm)
    if paradigm.workflow:  # a paradigm with a workflow of its own (common/paradigms)
        workflow = load_path(paradigm.workflow)
        return workflow(grid, config, on_round=on_round, on_progress=on_progress)  # type: ignore[no-any-return]
    grid = with_transport(grid, on_progress)  # packed models, adaptive polling, progress
    resume = None
    if config.resume_from:  # continue an interrupted run in its own folder, with its run id
        from server.resume import load_state

        resume = load_state(Path(config.resume_from))
        config = dataclasses.replace(
            config, out_dir=config.resume_from,
            plan=dataclasses.replace(config.plan, run_id=resume.run_id))
    elif not config.plan.run_id:
        # Nodes record the run id in their privacy ledgers; make one that never repeats.
        run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
        config = dataclasses.replace(config, plan=dataclasses.replace(config.plan, run_id=run_id))
    out_dir = Path(config.out_dir)
    report = RunReport(config=config)
    start_model, init = initial_model(config)  # refuses a bad plan or checkpoint first
    if init is not None:
        report.extra["init_from"] = init
    runner_ref: list[Any] = []

    def updated(entry: RoundLog, phase: str) -> None:
        if entry not in report.rounds:
            report.rounds.append(entry)
        report.write(out_dir)
        save_resume_state(out_dir, report, strategy, runner_ref)
        if phase == "evaluate" and on_round is not None:
            on_round(entry)

    hospital_dp = config.hospital_dp_noise > 0
    # Secure aggregation ("auto": on with >= 3 nodes) keeps hospital-level DP inside it.
    hospitals = max(len(list(grid.get_node_ids())), config.min_nodes)
    secure = secure_enabled(grid, config)  # the same count; warns when there are many
    strategy_class = VesaliusFedAvg
    secure_kwargs: dict[str, Any] = {}
    if secure:
        strategy_class = SecureFedAvg
        secure_kwargs = {"min_survivors": config.secagg_min_survivors,
                         "neighbours": config.secagg_neighbours,
                         "timeout": config.round_timeout, "dp_noise": config.hospital_dp_noise,
                         "dp_clip": config.hospital_dp_clip, "dp_delta": config.hospital_dp_delta,
                         "num_hospitals": hospitals}
    strategy = strategy_class(
        **secure_kwargs,
        checkpoint_dir=out_dir / "checkpoints",
        on_update=updated,
        on_refusal=config.on_refusal,
        # Hospital-level DP needs an unweighted average (each site's clipped update counts
        # once) and checkpoints only the noised model (the wrapper writes them).
        weighted_by_key=k.UNIT_WEIGHT if hospital_dp else k.NUM_EXAMPLES,
        checkpoint_in_aggregate=not hospital_dp or secure,
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        min_train_nodes=config.min_nodes,
        min_evaluate_nodes=config.min_nodes,
        min_available_nodes=config.min_nodes,
    )
    plan_record = config.plan.to_record()
    report.excluded = strategy.excluded  # the same dict: exclusions show in every write
    report.dropped = strategy.dropped
    start_arrays = ArrayRecord(start_model.state_dict())
    done = 0
    if resume is not None:
        start_arrays, done = resume_strategy(strategy, report, resume, out_dir)
    report.extra["secure_aggregation"] = secagg_record(
        enabled=secure, mode=config.secure_aggregation, hospitals=hospitals,
        min_survivors=secagg_threshold(hospitals, config.secagg_min_survivors),
        neighbours=config.secagg_neighbours, sessions=strategy.log_rows if isinstance(strategy, SecureFedAvg) else [])
    runner: VesaliusFedAvg | HospitalLevelDP = strategy
    if hospital_dp and isinstance(strategy, SecureFedAvg):
        report.hospital_dp = strategy.spent
        if resume is not None:
            strategy.restore(resume.hospital_dp_releases)
    elif hospital_dp:
        runner = HospitalLevelDP(
            strategy,
            noise_multiplier=config.hospital_dp_noise,
            clipping_norm=config.hospital_dp_clip,
            num_hospitals=max(len(list(grid.get_node_ids())), config.min_nodes),
            delta=config.hospital_dp_delta,
        )
        report.hospital_dp = runner.spent
        if resume is not None:
            runner.restore(resume.hospital_dp_releases)
    runner_ref.append(runner)
    try:
        result = runner.start(
            grid=grid,
            initial_arrays=start_arrays,
            num_rounds=config.plan.num_rounds - done,
            timeout=config.round_timeout,
            train_config=ConfigRecord(dict(plan_record)),
            # Histograms (where nodes consent) give each round's pooled validation AUC, on
            # which the final model is chosen (server/final_model.py).
            evaluate_config=ConfigRecord(
                {**plan_record, k.SPLIT: k.SPLIT_VAL, k.WITH_HISTOGRAMS: True}
            ),
        )
        failed = [e.round for e in report.rounds if e.status == "failed"]
        if not any(e.train and e.status == "aggregated" for e in report.rounds):
            report.status = "failed"
            report.reason = ("no round aggregated min-nodes training results (see the "
                             "errors of each round)")
        else:
            arrays, report.extra["model_selection"] = final_model(
                report.rounds, out_dir / "checkpoints", result.arrays
            )
            final_cfg = ConfigRecord(
                {**plan_record, k.SPLIT: k.SPLIT_TEST, k.WITH_HISTOGRAMS: True}
            )
            report.final = strategy.evaluate_everywhere(
                grid, arrays, final_cfg, timeout=config.round_timeout
            )
            (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save(arrays.to_torch_state_dict(), out_dir / "checkpoints" / "final.pt")
            report.extra["inference"] = final_inference(
                grid, arrays, config, [n for n in grid.get_node_ids()
                                       if n not in strategy.excluded], secure=secure
            )
            if report.final.evaluate_metrics and failed:
                report.status = "incomplete"
                report.reason = (
                    f"round(s) {', '.join(map(str, failed))} aggregated fewer than min-nodes = "
                    f"{config.min_nodes} training results; the global model skipped them")
            elif report.final.evaluate_metrics:
                report.status = "completed"
                if strategy.excluded:
                    report.reason = (
                        f"{len(strategy.excluded)} node(s) refused the plan and were excluded "
                        "from the rest of the run (see 'excluded')"
                    )
            else:
                report.status = "incomplete"
                report.reason = "no node returned final test metrics (see final.errors)"
    except RunStopped as exc:
        report.status = "stopped"
        report.reason = str(exc)
        log.warning("run stopped: %s", exc)
    except BaseException as exc:
        report.status = "failed"
        report.reason = f"{type(exc).__name__}: {exc}"
        report.write(out_dir)
        raise
    report.write(out_dir)
    from server.report_html import write_report_html

    write_report_html(report.to_dict(), out_dir / "report.html")
    log.info("run finished: %s", report.summary())
    return report


def save_resume_state(out_dir: Path, report: RunReport, strategy: VesaliusFedAvg,
                      runner: list[Any]) -> None:
    """Write ``resume-state.json`` beside the report (:mod:`server.resume`)."""
    from server.resume import ResumeState, save_state

    releases = int(getattr(runner[0], "releases", 0)) if runner else 0
    save_state(out_dir, ResumeState(
        run_id=report.config.plan.run_id, rounds=list(report.rounds),
        excluded=dict(strategy.excluded), dropped=dict(strategy.dropped),
        sites=dict(strategy.sites), hospital_dp_releases=releases))


def resume_strategy(strategy: VesaliusFedAvg, report: RunReport, resume: Any,
                    out_dir: Path) -> tuple[ArrayRecord, int]:
    """Restore an interrupted run's state; return the model to continue from and the number
    of rounds already done.

    Rounds after the last aggregated one with a checkpoint are dropped from the report: they
    run again (a node asked for a round again with the same model replays its earlier reply,
    :mod:`client.replay`, so its ledger does not count the round twice).
    """
    from server.final_model import load_checkpoint

    done = resume.last_aggregated_round(out_dir / "checkpoints")
    kept = [e for e in resume.rounds if e.round <= done]
    report.rounds.extend(kept)
    strategy.rounds.update({e.round: e for e in kept})
    strategy.excluded.update(resume.excluded)
    strategy.dropped.update(resume.dropped)
    strategy.sites.update(resume.sites)
    strategy.round_offset = done
    report.extra.setdefault("resumed", []).append({
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "from_round": done,
        "rounds_run_again": sorted({e.round for e in resume.rounds if e.round > done}),
    })
    arrays = load_checkpoint(out_dir / "checkpoints", done) if done else None
    if arrays is None:
        start_model, _ = initial_model(report.config)
        return ArrayRecord(start_model.state_dict()), 0
    log.info("resuming run %s after round %d", report.config.plan.run_id, done)
    return arrays, done


def final_model(
    rounds: list[RoundLog], checkpoint_dir: Path, last: ArrayRecord
) -> tuple[ArrayRecord, dict[str, Any]]:
    """The final model: the checkpoint of the round with the best validation AUC.

    :func:`server.final_model.select_final_round` picks the round; its checkpoint
    (``round-<r>.pt``) is loaded. Without a usable round or checkpoint the last round's model
    is kept, and the returned selection (``report.json``'s ``model_selection``) says so.
    """
    from server.final_model import load_checkpoint, select_final_round

    selection = select_final_round(rounds)
    last_round = max((r.round for r in rounds if r.train), default=0)
    if selection is None:
        return last, {"final_round": last_round, "selection": "last round",
                      "note": "no round has validation metrics"}
    arrays = load_checkpoint(checkpoint_dir, int(selection["final_round"]))
    if arrays is None:
        return last, {**selection, "final_round": last_round, "selection": "last round",
                      "note": f"no checkpoint of round {selection['final_round']}"}
    selection["checkpoint"] = f"checkpoints/round-{selection['final_round']}.pt"
    return arrays, selection


def final_inference(
    grid: Grid, arrays: ArrayRecord, config: RunConfig, node_ids: list[int], *,
    secure: bool = False,
) -> dict[str, object]:
    """Pooled inference on the final model over the nodes' test splits (statistics queries).

    The scores are recalibrated and the decision threshold chosen on the validation patients
    (:func:`server.final_model.calibrated_inference`; Youden's J, or the run's target
    sensitivity); metrics with confidence intervals at that operating point, the pooled AUC
    with its DeLong interval, calibration before and after and a between-site meta-analysis
    come from sums the nodes release under their own release rules (:mod:`client.release`).
    A failure here never fails the run: the report says why.

    The other tasks get their own pooled inference (:mod:`server.inference_tasks`). The
    section's ``task`` names the run's task. ``secure``: the run's secure aggregation is on,
    so the statistics queries it covers are summed securely (:mod:`server.inference_secure`).
    """
    from server.inference_secure import secure_queries
    from server.inference_tasks import task_inference

    task = config.plan.task
    try:
        with secure_queries(secure, min_survivors=config.secagg_min_survivors,
                            neighbours=config.secagg_neighbours):
            section = task_inference(task)(grid, node_ids, arrays, config)
    except Exception as exc:  # noqa: BLE001 - inference is an extra; the run already completed
        log.warning("pooled inference failed: %s", exc)
        return {"task": task, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    return {"task": task, **section}


def build_server_app(
    config: RunConfig | None = None,
    *,
    on_round: RoundCallback | None = None,
    on_finish: Callable[[RunReport], None] | None = None,
    on_progress: ProgressCallback | None = None,
) -> ServerApp:
    """Build the ServerApp.

    ``config`` overrides Flower's run config (simulations build it in-process); ``on_round``,
    ``on_progress`` and ``on_finish`` let an in-process caller follow progress and receive the
    report. Deployed (no ``config``), the ServerApp prints progress and round-summary marker
    lines instead, which Flower streams to ``vesalius federation run --superlink``.
    """
    server_app = ServerApp()
    deployed = config is None

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = config if config is not None else RunConfig.from_user_config(context.run_config)
        if deployed:  # a node's reply is pulled from the SuperLink without Flower's 1 s back-off
            from common.flower_pulls import SUPERLINK_BACKOFF_S, poll_objects_quickly

            poll_objects_quickly("flwr.superlink.grid.http_grid", *SUPERLINK_BACKOFF_S)
        cv = CVSpec.from_user_config(context.run_config)
        progress = on_progress if on_progress is not None or not deployed else emit_marker
        if cv.enabled:  # `vesalius federation cv --superlink ...`
            run_cross_validation(with_transport(grid, progress), cfg, num_folds=cv.num_folds,
                                 leave_one_site_out=cv.leave_one_site_out,
                                 out_dir=Path(cfg.out_dir))
            return
        rounds = on_round
        if rounds is None and deployed:
            def rounds(entry: RoundLog) -> None:
                emit_round_marker(round_dict(entry))
        state_dir = run_records.coordinator_dir() if deployed else None
        out = Path(cfg.resume_from or cfg.out_dir)
        if state_dir is not None:  # `vesalius coordinator start --resume` can continue it
            run_records.write_active_run(state_dir, out, {
                key: value for key, value in context.run_config.items()
                if key != k.RESUME_FROM})
        report = run_federation(grid, cfg, on_round=rounds, on_progress=progress)
        if state_dir is not None:
            run_records.finish_active_run(state_dir, out, report.status)
        if on_finish is not None:
            on_finish(report)

    return server_app


app = build_server_app()
