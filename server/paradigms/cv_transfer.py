"""Cross-validation of ``--paradigm transfer`` (``vesalius federation cv --paradigm transfer``).

The paradigm's ``fold`` hook (:func:`run_transfer_fold`, :func:`server.cv.fold_runner`) trains
and evaluates one fold, in the fold's folder and under run ids derived from the fold's, so
every node's ledger records each stage per fold:

1. with ``-P pretrain-rounds=N``: federated self-supervised pretext rounds (stage
   ``self-supervised-rounds``) on the fold's training nodes and, at each node, the fold's
   training patients only (the nodes' CV split: a held-out patient never enters it; the
   nodes' unlabelled patients join as in a run), from the fold's seeded model, at
   ``ε * pretrain-share``; the encoder (the model without its output layer) is written to
   ``fold-<k>/pretrain/checkpoints/encoder.pt`` (run id ``<fold run>-pretrain``);
2. fine-tuning (stage ``fine-tune-rounds``, the ``freeze`` groups frozen) from that encoder
   or from ``-P pretrained=FILE`` (its SHA-256 and tensors loaded in the fold's report and
   notes, and in every node's ledger entries through the stage's ``init-sha256`` option) at
   the rest of ε, under the fold's own run id, in ``fold-<k>/``;
3. the fine-tuned model's held-out evaluation, :func:`server.cv.evaluate_fold`, as for
   supervised folds.

The scratch arm of ``federation run --paradigm transfer`` is not run in cross-validation
(``compare-scratch`` is ignored): ``vesalius federation cv`` without ``--paradigm`` at the same
ε and seed is that comparison, fold for fold. A fold's ε per hospital adds its pretraining
and fine-tuning spends (basic composition, an upper bound); each hospital's ledger total is
``epsilon_dataset``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.serverapp import Grid

from common.config import RunConfig
from common.paradigms import canonical_options, get_paradigm, read_options
from common.paradigms.self_supervised import ROUNDS, stage_run_id
from common.paradigms.transfer import FINE_TUNE
from server.paradigms.self_supervised import ENCODER_FILE, save_encoder
from server.paradigms.transfer import fine_tune_options, source_of
from server.report import RunReport

__all__ = ["pretrain_fine_tune_fold", "run_transfer_fold"]


def _pretrain_config(config: RunConfig, options: dict[str, Any], out_dir: Path) -> RunConfig:
    stage = {opt.name: options[opt.name] for opt in ROUNDS.options}
    return dataclasses.replace(config, out_dir=str(out_dir / "pretrain"), plan=dataclasses.replace(
        config.plan, paradigm=ROUNDS.name, paradigm_options=canonical_options(stage),
        run_id=stage_run_id(config.plan.run_id, "pretrain"),
        target_epsilon=config.plan.target_epsilon * float(options["pretrain-share"]),
        num_rounds=int(options["pretrain-rounds"])))


def _fine_config(config: RunConfig, options: dict[str, Any], source: str, sha256: str,
                 target_epsilon: float) -> RunConfig:
    return dataclasses.replace(config, init_from=source, plan=dataclasses.replace(
        config.plan, paradigm=FINE_TUNE.name, target_epsilon=target_epsilon,
        paradigm_options=canonical_options(fine_tune_options(options, sha256))))


def _composed_sites(fine: RunReport, pre: RunReport | None) -> list[dict[str, Any]]:
    """The fine-tuning stage's site rows, each ε plus the site's pretraining ε."""
    rows = fine.sites()
    if pre is None:
        return rows
    if not rows:  # fine-tuning never ran (pretraining failed): pretraining's spend alone
        return pre.sites()
    pre_eps = {row["site"]: row.get("epsilon") for row in pre.sites()}
    for row in rows:
        extra = pre_eps.get(row["site"])
        if row.get("epsilon") is not None and extra is not None:
            row["epsilon"] = row["epsilon"] + extra
    return rows


def run_transfer_fold(
    grid: Grid, config: RunConfig, outcome: Any, *, train_nodes: Sequence[int] | None,
    heldout_nodes: Sequence[int] | None, progress: Any, num_folds: int, secure: bool = False,
) -> Any:
    """One cross-validation fold of ``--paradigm transfer`` (see the module docstring), with
    :func:`server.cv.run_fold`'s signature; node failures are recorded, never raised."""
    options = read_options(get_paradigm(config.plan.paradigm), config.plan.paradigm_options)
    return pretrain_fine_tune_fold(grid, config, outcome, options, train_nodes=train_nodes,
                                   heldout_nodes=heldout_nodes, progress=progress,
                                   num_folds=num_folds, secure=secure)


def pretrain_fine_tune_fold(
    grid: Grid, config: RunConfig, outcome: Any, options: dict[str, Any], *,
    train_nodes: Sequence[int] | None, heldout_nodes: Sequence[int] | None, progress: Any,
    num_folds: int, secure: bool = False, scratch_note: bool = True,
) -> Any:
    """(Pretrain,) fine-tune and evaluate one fold with ``options`` of ``transfer``'s names
    (``pretrained``, ``pretrain-rounds``, ``pretrain-share``, ``freeze`` and the pretext's);
    ``scratch_note``: say in the notes that the scratch arm is not run."""
    from server.cv import evaluate_fold, fold_guard, fold_initial_arrays, fold_initial_model
    from server.cv import train_rounds

    source = source_of(config, options)  # a ConfigError stops the whole cross-validation
    out_dir = Path(config.out_dir)
    eps = config.plan.target_epsilon
    pre_config = _pretrain_config(config, options, out_dir) \
        if int(options["pretrain-rounds"]) > 0 else None
    fine_eps = eps - pre_config.plan.target_epsilon if pre_config is not None else eps
    fine = RunReport(config=config)
    pre = RunReport(config=pre_config) if pre_config is not None else None
    reports = [r for r in (pre, fine) if r is not None]
    stage_kw: dict[str, Any] = {"train_nodes": train_nodes, "num_folds": num_folds,
                                "secure": secure}
    with fold_guard(outcome, reports, out_dir, sites=lambda: _composed_sites(fine, pre)):
        if pre is not None and pre_config is not None:
            arrays = train_rounds(grid, pre_config, outcome, pre,
                                  initial=fold_initial_arrays(pre_config, outcome.fold),
                                  progress=None, **stage_kw)
            if arrays is None:
                outcome.reason = f"self-supervised pretraining: {outcome.reason}"
                return outcome
            source = str(out_dir / "pretrain" / "checkpoints" / ENCODER_FILE)
            save_encoder(dict(arrays.to_torch_state_dict()), config.plan.model, Path(source))
        initial, loaded = fold_initial_model(_fine_config(config, options, source, "", fine_eps),
                                             outcome.fold)
        sha256 = str((loaded or {}).get("sha256", ""))
        fine.config = _fine_config(config, options, source, sha256, fine_eps)
        fine.extra["init_from"] = loaded
        arrays = train_rounds(grid, fine.config, outcome, fine, initial=initial,
                              progress=progress, **stage_kw)
        outcome.rounds = [entry for r in reports for entry in r.rounds]
        outcome.sites = _composed_sites(fine, pre)
        outcome.notes.extend(_notes(options, outcome.fold, source, loaded, pre is not None,
                                    eps, fine_eps, scratch_note))
        if arrays is not None:
            evaluate_fold(grid, arrays, fine.config, outcome, heldout_nodes=heldout_nodes,
                          secure=secure)
    return outcome


def _notes(options: dict[str, Any], fold: int, source: str, loaded: dict[str, Any] | None,
           pretrained_here: bool, eps: float, fine_eps: float, scratch_note: bool) -> list[str]:
    init = loaded or {}
    origin = (f"fold-{fold}/pretrain/checkpoints/{ENCODER_FILE}, this fold's self-supervised "
              f"pretraining ({options['pretext']}, {options['pretrain-rounds']} rounds on the "
              "fold's training patients only)" if pretrained_here
              else f"the local file {Path(source).name}")
    notes = [
        f"fold {fold}: fine-tuned from {origin}, sha256 {init.get('sha256', '?')} "
        f"({init.get('tensors_loaded', '?')} tensors loaded, "
        f"{init.get('tensors_skipped', '?')} skipped); every hospital's ledger records the "
        "hash with each fine-tuning round",
        f"freeze while fine-tuning: {options['freeze']}",
        *(["the scratch arm is not run in cross-validation (compare-scratch ignored): run "
           "`vesalius federation cv` without --paradigm at the same ε and seed to compare"]
          if scratch_note else []),
        "each fold's held-out patients never train (pretraining and fine-tuning use the "
        "fold's training patients); the held-out evaluation is the fine-tuned model's",
    ]
    if pretrained_here:
        notes.append(f"target ε per hospital over all folds: {eps:g} = {eps - fine_eps:g} "
                     f"pretraining + {fine_eps:g} fine-tuning; a fold's ε per hospital adds "
                     "both stages' spends (basic composition, an upper bound)")
    return notes
