"""The coordinator's workflow of ``--paradigm transfer`` (see :mod:`common.paradigms.transfer`).

Sub-runs, each in its own folder of ``--out`` with a run id derived from the run's, so that
every node's ledger records each one:

``pretrain/`` (``<run>-pretrain``, with ``-P pretrain-rounds=N``)
    federated self-supervised pretraining at ``ε * pretrain-share``
    (:func:`server.paradigms.self_supervised.pretrain`);
``transfer/`` (``<run>-transfer``)
    fine-tuning from the pretrained weights (``--init-from``: SHA-256 and tensors loaded in
    its report) with the ``freeze`` groups frozen, at the rest of the run's ε;
``scratch/`` (``<run>-scratch``, unless ``-P compare-scratch=false``)
    the same supervised run from the seed's initial weights at the run's ε.

The run's own report is the transfer arm's (its final model is ``checkpoints/final.pt``, its
inference the run's result) plus the paradigm section comparing the arms: the headline pooled
test metric, each arm's ε per hospital and each hospital's ledger total, and the validation
metric per round per arm.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.errors import ConfigError
from common.paradigms import canonical_options, get_paradigm, read_options
from common.paradigms.self_supervised import stage_run_id
from common.paradigms.transfer import FINE_TUNE
from server.paradigms.self_supervised import ENCODER_FILE, pretrain, with_run_id
from server.report import RunReport

__all__ = ["fine_tune_options", "headline_metric", "run_transfer", "source_of",
           "validation_curve"]

#: The headline pooled test metric of each task's inference section.
_HEADLINE = {"binary": ("test AUC", ("metrics", "auc")),
             "multiclass": ("test macro AUC", ("multiclass", "auc", "macro"))}


def headline_metric(report: RunReport) -> float | None:
    """The task's headline pooled test metric from the report's inference section."""
    node: Any = report.extra.get("inference") or {}
    for key in _HEADLINE[report.config.plan.task][1]:
        node = node.get(key) if isinstance(node, dict) else None
    if isinstance(node, dict):  # a metric with its interval: {"value": ..., "lower": ...}
        node = node.get("value")
    try:
        value = float(node)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def validation_curve(report: RunReport) -> tuple[str, list[float | None]]:
    """The pooled validation metric per round (AUC where the nodes released it, else loss)."""
    for key in (k.AUC_POOLED, k.AUC, k.LOSS):
        values: list[float | None] = []
        for entry in report.rounds:
            if entry.train:
                v = entry.evaluate_metrics.get(key)
                values.append(float(v) if v is not None and math.isfinite(float(v)) else None)
        if any(v is not None for v in values):
            return key, values
    return k.LOSS, []


def _site_eps(report: RunReport | None) -> dict[str, dict[str, Any]]:
    return {s["site"]: s for s in report.sites()} if report is not None else {}


def _sub(config: RunConfig, out_dir: Path, stage: str, **plan: Any) -> RunConfig:
    return dataclasses.replace(
        config, out_dir=str(out_dir / stage), init_from=plan.pop("init_from", ""),
        plan=dataclasses.replace(config.plan, run_id=stage_run_id(config.plan.run_id, stage),
                                 **plan))


def fine_tune_options(options: dict[str, Any], sha256: str) -> dict[str, Any]:
    """The ``fine-tune-rounds`` stage's options: the freeze groups and the SHA-256 of the
    weights it starts from (every node's ledger records them with each round)."""
    return {"freeze": options["freeze"], "init-sha256": sha256}


def source_of(config: RunConfig, options: dict[str, Any]) -> str:
    """The local checkpoint ``-P pretrained`` names ("" with in-run pretraining); a
    :class:`ConfigError` for ``--init-from``, which this paradigm takes as ``-P pretrained``."""
    if config.init_from:
        raise ConfigError("--paradigm transfer takes its pretrained weights as -P "
                          "pretrained=PATH (or -P pretrain-rounds=N), not --init-from")
    return str(options["pretrained"])


def run_transfer(grid: Grid, config: RunConfig, *,
                 on_round: Callable[..., None] | None = None,
                 on_progress: Callable[..., None] | None = None) -> RunReport:
    """The coordinator's workflow: (pretrain,) fine-tune, scratch; the comparing report."""
    from server.app import run_federation
    from server.report_html import write_report_html

    config = with_run_id(config)
    paradigm = get_paradigm(config.plan.paradigm)
    options = read_options(paradigm, config.plan.paradigm_options)
    source = source_of(config, options)
    out_dir = Path(config.out_dir)
    eps = config.plan.target_epsilon
    rounds = int(options["pretrain-rounds"])
    pre = None
    fine_eps = eps
    if rounds > 0:
        share = float(options["pretrain-share"])
        pre = pretrain(grid, config, options, out_dir=out_dir / "pretrain",
                       run_id=stage_run_id(config.plan.run_id, "pretrain"),
                       target_epsilon=eps * share, rounds=rounds, on_progress=on_progress)
        source, fine_eps = str(pre.path), eps * (1 - share)
    sha256 = pre.sha256 if pre is not None else hashlib.sha256(
        Path(source).read_bytes()).hexdigest()
    transfer = run_federation(grid, _sub(
        config, out_dir, "transfer", init_from=source, paradigm=FINE_TUNE.name,
        paradigm_options=canonical_options(fine_tune_options(options, sha256)),
        target_epsilon=fine_eps), on_round=on_round, on_progress=on_progress)
    scratch = None
    if options["compare-scratch"]:
        scratch = run_federation(grid, _sub(
            config, out_dir, "scratch", paradigm="supervised", paradigm_options="",
            target_epsilon=eps), on_progress=on_progress)
    report = transfer
    report.config = config
    (out_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
    final = out_dir / "transfer" / "checkpoints" / "final.pt"
    if final.is_file():
        shutil.copyfile(final, out_dir / "checkpoints" / "final.pt")
    if pre is not None:
        shutil.copyfile(pre.path, out_dir / "checkpoints" / ENCODER_FILE)
    report.extra["paradigm"] = _section(paradigm, options, config, pre, transfer, scratch,
                                        source, fine_eps)
    report.write(out_dir)
    write_report_html(report.to_dict(), out_dir / "report.html")
    return report


def _section(paradigm: Any, options: dict[str, Any], config: RunConfig, pre: Any,
             transfer: RunReport, scratch: RunReport | None, source: str,
             fine_eps: float) -> dict[str, Any]:
    """The report's paradigm section: arms, ε per hospital, validation curves."""
    metric_name = _HEADLINE[config.plan.task][0]
    arms: list[tuple[str, RunReport | None, str]] = [
        ("transfer", transfer, f"<run>-transfer{' + <run>-pretrain' if pre else ''}")]
    if scratch is not None:
        arms.append(("scratch", scratch, "<run>-scratch"))
    pre_sites = _site_eps(pre.report if pre is not None else None)
    sites = sorted(set(_site_eps(transfer)) | set(_site_eps(scratch)) | set(pre_sites))
    arm_rows = []
    for name, rep, ids in arms:
        site_eps = _site_eps(rep)
        eps_cols = []
        for site in sites:
            value = (site_eps.get(site) or {}).get("epsilon")
            if name == "transfer" and pre is not None:
                pre_value = (pre_sites.get(site) or {}).get("epsilon")
                value = (value + pre_value) if value is not None and pre_value is not None \
                    else None
            eps_cols.append(value)
        arm_rows.append([name, headline_metric(rep) if rep else None, *eps_cols])
    ledger_rows = []
    for site in sites:
        pre_e = (pre_sites.get(site) or {}).get("epsilon")
        fine_e = (_site_eps(transfer).get(site) or {}).get("epsilon")
        scratch_e = (_site_eps(scratch).get(site) or {}).get("epsilon")
        totals = [(r.get(site) or {}).get("epsilon_dataset")
                  for r in (pre_sites, _site_eps(transfer), _site_eps(scratch))]
        known = [t for t in totals if t is not None]
        ledger_rows.append([site, pre_e, fine_e, scratch_e, max(known) if known else None])
    curves: dict[str, list[float | None]] = {}
    key = k.LOSS
    for name, rep, _ in arms:
        if rep is not None:
            key, curves[name] = validation_curve(rep)
    width = max((len(v) for v in curves.values()), default=0)
    init = transfer.extra.get("init_from") or {}
    notes = [
        f"pretrained weights: {Path(source).name} sha256 {init.get('sha256', '?')} "
        f"({init.get('tensors_loaded', '?')} tensors loaded, "
        f"{init.get('tensors_skipped', '?')} skipped; kept from the seed: "
        f"{', '.join(init.get('kept_from_seed') or []) or 'none'})"
        + (f", from this run's self-supervised pretraining ({options['pretext']}, "
           f"{options['pretrain-rounds']} rounds)" if pre is not None else ", a local file"),
        f"freeze: {options['freeze']}",
        f"target ε per arm: {config.plan.target_epsilon:g}"
        + (f" (transfer: {config.plan.target_epsilon - fine_eps:g} pretraining + "
           f"{fine_eps:g} fine-tuning)" if pre is not None else ""),
        "each arm is its own sub-run on every hospital's ledger (run ids <run>-pretrain, "
        "-transfer, -scratch); a transfer arm's ε adds its pretraining and fine-tuning "
        "spends (basic composition, an upper bound); 'ledger total' is what each hospital's "
        "ledger holds for its dataset after all arms (every arm trains the same patients, "
        "so the arms' spends compose)",
        "the checkpoint's SHA-256 is also in every hospital's ledger entry of each "
        "fine-tuning round (entry parameter paradigm_options, init-sha256)",
        "the run's result (final model, inference above) is the transfer arm's",
    ]
    return {
        "name": paradigm.name, "summary": paradigm.summary,
        "scope": ("the Result is the transfer arm's; the Privacy section is its fine-tuning "
                  "sub-run's alone: each hospital's ε over pretraining, fine-tuning and the "
                  "scratch arm (its ledger total) is in the Learning paradigm section."),
        "options": {key_: options[key_] for key_ in ("pretrained", "pretrain-rounds", "freeze",
                                                      "compare-scratch")},
        "pretrained": {"checkpoint": Path(source).name, "sha256": init.get("sha256"),
                       "tensors_loaded": init.get("tensors_loaded"),
                       "tensors_skipped": init.get("tensors_skipped")},
        "notes": notes,
        "tables": [
            {"title": f"transfer vs scratch at the same ε ({metric_name}; ε per hospital)",
             "columns": ["arm", metric_name, *[f"ε {s}" for s in sites]], "rows": arm_rows},
            {"title": "ε per hospital, per arm, and the ledger's total",
             "columns": ["hospital", "ε pretrain", "ε fine-tune", "ε scratch", "ledger total"],
             "rows": ledger_rows},
        ],
        "plots": [{"title": f"validation {key} per round", "x_label": "round", "y_label": key,
                   "x": list(range(1, width + 1)), "series": curves}],
    }
