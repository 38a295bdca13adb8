"""Cross-validation of ``--paradigm self-supervised``: the encoder judged by a linear probe.

A self-supervised run outputs an encoder, not a predictor, so a fold has nothing to evaluate
on its held-out patients unless a predictor is made from the encoder. This module supports
``vesalius federation cv --paradigm self-supervised`` (rather than refusing it) with the
usual protocol for judging a self-supervised encoder, the *linear probe*, built on the same
fold steps as transfer (:func:`server.paradigms.cv_transfer.pretrain_fine_tune_fold`). Per
fold:

1. ``--rounds`` pretext rounds (``-P pretext=...``) on the fold's training nodes and patients
   (plus the nodes' unlabelled patients; never the fold's held-out ones) at half the run's ε;
2. ``--rounds`` rounds training the model's output layer only (``freeze=trunk``) from that
   encoder, on the fold's labelled training patients, at the other half;
3. the held-out evaluation of :func:`server.cv.evaluate_fold` on the probe.

Why support it: refusing would leave the encoder without a cross-validated estimate, and
the probe reuses transfer's fold steps (no second implementation); the choices a user may
want to change (the ε split, more rounds, fine-tuning more layers) are transfer's options,
so the notes point to ``--paradigm transfer -P pretrain-rounds=N -P freeze=...`` for them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flwr.serverapp import Grid

from common.config import RunConfig
from common.errors import ConfigError
from common.paradigms import get_paradigm, read_options

__all__ = ["PROBE_FREEZE", "PROBE_SHARE", "run_self_supervised_fold"]

PROBE_FREEZE = "trunk"
"""A linear probe trains the output layer only."""

PROBE_SHARE = 0.5
"""The share of the run's ε the pretext rounds may spend (the probe gets the rest)."""


def run_self_supervised_fold(
    grid: Grid, config: RunConfig, outcome: Any, *, train_nodes: Sequence[int] | None,
    heldout_nodes: Sequence[int] | None, progress: Any, num_folds: int, secure: bool = False,
) -> Any:
    """One fold: pretext rounds, a linear probe, its held-out evaluation (module docstring).

    Raises
    ------
    ConfigError
        ``--init-from`` was given (the pretext rounds start from the fold's seeded model).
    """
    from server.paradigms.cv_transfer import pretrain_fine_tune_fold

    if config.init_from:
        raise ConfigError("--paradigm self-supervised in cross-validation pretrains from the "
                          "seed; drop --init-from (or use --paradigm transfer -P "
                          "pretrained=PATH)")
    options = read_options(get_paradigm(config.plan.paradigm), config.plan.paradigm_options)
    rounds = config.plan.num_rounds
    probe = {**options, "pretrained": "", "pretrain-rounds": rounds,
             "pretrain-share": PROBE_SHARE, "freeze": PROBE_FREEZE}
    outcome = pretrain_fine_tune_fold(grid, config, outcome, probe, train_nodes=train_nodes,
                                      heldout_nodes=heldout_nodes, progress=progress,
                                      num_folds=num_folds, secure=secure, scratch_note=False)
    outcome.notes.append(
        f"self-supervised in cross-validation: each fold's encoder ({rounds} "
        f"{options['pretext']} pretext rounds) is judged by a linear probe ({rounds} rounds "
        "training the output layer only, freeze=trunk) evaluated on the fold's held-out "
        f"patients; ε split {PROBE_SHARE:.0%} / {1 - PROBE_SHARE:.0%}. For another split, "
        "more rounds or more layers fine-tuned: --paradigm transfer -P pretrain-rounds=N "
        "-P freeze=...")
    return outcome
