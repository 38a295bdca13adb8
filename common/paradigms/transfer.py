"""Transfer learning: fine-tune from pretrained weights, compared with training from scratch.

``--paradigm transfer`` starts the plan's model from pretrained weights, either a local
checkpoint (``-P pretrained=PATH``; its SHA-256 and the tensors
loaded go in the report) or a federated self-supervised pretraining run first, in the same
run (``-P pretrain-rounds=N``, :mod:`common.paradigms.self_supervised`), and fine-tunes it
with chosen layer groups frozen (``-P freeze=none|trunk|<groups>``, :data:`LAYER_GROUPS`).

Unless ``-P compare-scratch=false`` the run also trains the same model from scratch, and the
report compares the two arms at the same ε: with in-run pretraining, the transfer arm's ε is
shared between pretraining (``pretrain-share``) and fine-tuning, so that each arm's target is
the run's ε; every arm is its own sub-run (run id ``<run>-pretrain``, ``-transfer``,
``-scratch``) on every node's ledger, and the report lists each arm's spend and the total each
hospital's ledger holds. The transfer arm's final model and inference are the run's result.

The coordinator's workflow is :func:`server.paradigms.transfer.run_transfer`; the fine-tuning
rounds run under the stage paradigm ``fine-tune-rounds`` (node hook
:func:`client.paradigms.transfer.fine_tune_training`: freeze, then the task's own training),
whose option ``init-sha256`` carries the SHA-256 of the weights fine-tuning starts from (the
local file, or the federated-pretrained encoder) to every node: each node's ledger entry of
each fine-tuning round records it (its ``params``: ``paradigm`` and ``paradigm_options``).

Cross-validation (``vesalius federation cv --paradigm transfer``): every fold pretrains (with
``pretrain-rounds``) on the fold's training patients only, fine-tunes, and is evaluated on
its held-out part (:mod:`server.paradigms.cv_transfer`); the scratch arm is not run there.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, ParadigmOption, register_paradigm
from common.paradigms.self_supervised import HEAD_LAYERS, check_encoder_model, pretext_options

__all__ = ["FINE_TUNE", "LAYER_GROUPS", "TRANSFER", "frozen_prefixes"]

LAYER_GROUPS: dict[str, dict[str, tuple[str, ...]]] = {
    "cnn": {"block1": ("features.0.",), "block2": ("features.1.",),
            "block3": ("features.2.",), "head": ("classifier.",)},
    "resnet": {"stem": ("conv1.", "bn1."), "layer1": ("layer1.",), "layer2": ("layer2.",),
               "layer3": ("layer3.",), "layer4": ("layer4.",), "head": ("fc.",)},
    "densenet": {"stem": ("features.conv0.", "features.norm0."),
                 "block1": ("features.denseblock1.", "features.transition1."),
                 "block2": ("features.denseblock2.", "features.transition2."),
                 "block3": ("features.denseblock3.", "features.norm5."),
                 "head": ("class_layers.",)},
}
"""Layer groups of each model family, by parameter-name prefix; ``trunk`` is every group but
``head`` (the output layer of :data:`common.paradigms.self_supervised.HEAD_LAYERS`)."""


def frozen_prefixes(model: str, freeze: str) -> tuple[str, ...]:
    """Parameter-name prefixes ``freeze`` names for ``model`` (``()`` for ``none``).

    Raises
    ------
    ConfigError
        An unknown group, or a choice that freezes every group (nothing left to train).
    """
    groups = LAYER_GROUPS.get(model)
    if groups is None:
        raise ConfigError(f"--paradigm transfer: model {model!r} has no layer groups; use "
                          f"--model {' or '.join(sorted(LAYER_GROUPS))}")
    names = [n.strip() for n in freeze.split(",") if n.strip()]
    if names in ([], ["none"]):
        return ()
    trunk = [g for g in groups if g != "head"]
    names = list(dict.fromkeys(g for n in names for g in (trunk if n == "trunk" else [n])))
    unknown = [n for n in names if n not in groups]
    if unknown:
        raise ConfigError(f"freeze: model {model!r} has no layer group "
                          f"{', '.join(map(repr, unknown))}; its groups: none, trunk, "
                          f"{', '.join(groups)} (comma-separated)")
    if set(names) == set(groups):
        raise ConfigError("freeze names every layer group: nothing would be trained; leave "
                          "at least the head trainable (e.g. freeze=trunk)")
    return tuple(p for n in names for p in groups[n])


def _check(plan: Any, options: Mapping[str, Any]) -> None:
    if plan.model not in HEAD_LAYERS:
        raise ConfigError(
            f"--paradigm transfer needs a model with a trunk/head split; model {plan.model!r} "
            f"has none it knows; use --model {' or '.join(sorted(HEAD_LAYERS))}")
    if plan.task not in ("binary", "multiclass"):
        raise ConfigError(f"--paradigm transfer fine-tunes a classifier: --task binary or "
                          f"multiclass, not {plan.task!r}")
    frozen_prefixes(plan.model, str(options.get("freeze", "none")))
    pretrained = str(options.get("pretrained", ""))
    if int(options.get("pretrain-rounds", 0)) > 0:
        if pretrained:
            raise ConfigError("give -P pretrained=PATH or -P pretrain-rounds=N, not both")
        check_encoder_model(plan, "transfer")
    elif not pretrained:
        raise ConfigError("--paradigm transfer needs pretrained weights: -P pretrained=PATH "
                          "(a local checkpoint, e.g. checkpoints/encoder.pt of a "
                          "self-supervised run) or -P pretrain-rounds=N to pretrain "
                          "self-supervised first in this run")
    elif not Path(pretrained).is_file():
        raise ConfigError(f"-P pretrained={pretrained}: no such file; give the path of a "
                          "checkpoint such as an earlier run's checkpoints/encoder.pt")


def _fine_tune_check(plan: Any, options: Mapping[str, Any]) -> None:
    frozen_prefixes(plan.model, str(options.get("freeze", "none")))


TRANSFER = register_paradigm(Paradigm(
    name="transfer",
    summary="fine-tune from pretrained weights (a local checkpoint or in-run federated "
            "self-supervised pretraining), freezing chosen layer groups; compared with "
            "training from scratch at the same ε",
    options=(
        ParadigmOption("pretrained", str, "", "local checkpoint to start from (a state dict, "
                       "e.g. an earlier run's checkpoints/encoder.pt; use it instead of "
                       "--init-from)"),
        ParadigmOption("pretrain-rounds", int, 0, "rounds of federated self-supervised "
                       "pretraining first, in this run (0: use pretrained)",
                       minimum=0, maximum=1000),
        ParadigmOption("pretrain-share", float, 0.5, "with pretrain-rounds: the share of the "
                       "run's ε the pretraining may spend (the rest is fine-tuning's)",
                       minimum=0.05, maximum=0.95),
        ParadigmOption("freeze", str, "none", "layer groups kept frozen while fine-tuning: "
                       "none, trunk or comma-separated group names of the model"),
        ParadigmOption("compare-scratch", bool, True, "also train from scratch at the same ε "
                       "and compare"),
        *pretext_options(),
    ),
    workflow="server.paradigms.transfer:run_transfer",
    cv=True,
    fold="server.paradigms.cv_transfer:run_transfer_fold",
    tasks=("binary", "multiclass"),
    check=_check,
))

FINE_TUNE = register_paradigm(Paradigm(
    name="fine-tune-rounds",
    summary="stage of transfer: supervised rounds with chosen layer groups frozen (run "
            "--paradigm transfer instead)",
    options=(ParadigmOption("freeze", str, "none", "layer groups kept frozen: none, trunk "
                            "or comma-separated group names"),
             ParadigmOption("init-sha256", str, "", "SHA-256 of the weights fine-tuning "
                            "starts from (set by the transfer workflow; every node's ledger "
                            "records it)")),
    node="client.paradigms.transfer:fine_tune_training",
    cv=False,
    tasks=("binary", "multiclass"),
    check=_fine_tune_check,
    stage=True,
))
