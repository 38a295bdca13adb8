"""Federated self-supervised pretraining: a pretext task on every training image a node holds.

``--paradigm self-supervised`` trains the *encoder* (trunk) of the plan's model with DP-SGD on
a pretext task that needs no label (every node's training patients, labelled or not: the
unlabelled ones of :func:`client.data.task_data.load_unlabelled` join them, and all count in
the accountant's patient number; never a test split), and outputs the encoder checkpoint
(``<out>/checkpoints/encoder.pt``, its SHA-256 in the report), usable as ``--init-from`` of a
supervised run or ``-P pretrained=`` of ``--paradigm transfer``.

Pretexts (``-P pretext=``), each a per-sample loss (one patient = one record):

``rotation``
    The record is one image of the patient rotated by 0, 90, 180 or 270 degrees (drawn at the
    node); the loss is the cross-entropy of the 4-way rotation prediction.
``masked``
    Square patches (``-P patch=``) of one image are masked (``-P mask-ratio=``); the model
    reconstructs the image from the rest and the loss is the MSE on the masked pixels.
``contrastive``
    SimCLR-style, made DP-safe: ``-P views=N`` augmented views of one patient form ONE record;
    the loss is a SimSiam-style negative cosine between each view's prediction and the
    stop-gradient projection of the record's other views. No other patient of the batch
    serves as a negative: that would couple records, so one patient's removal would change
    other patients' gradients and DP-SGD's per-record clipping would no longer bound a
    patient's influence. Collapse is held off by the asymmetric predictor and the
    stop-gradient (Chen & He, 2021), not by negatives.

The pretext head sits on the penultimate features of the plan's model (its own output layer,
:data:`HEAD_LAYERS`, is bypassed and left unchanged). The federation exchanges the plan's
model only, so the head cannot be averaged: it is a fixed random projection drawn from the
run's seed, the same at every node and round, which the encoder learns to serve (a constant
objective for the whole federation; it adds no parameters to clip or noise).

The coordinator's workflow is :func:`server.paradigms.self_supervised.run_self_supervised`; its
rounds run under the stage paradigm ``self-supervised-rounds`` (the node hook
:func:`client.paradigms.self_supervised.self_supervised_training`), which ``--paradigm
transfer`` uses too for ``-P pretrain-rounds=N``.

Cross-validation (``vesalius federation cv --paradigm self-supervised``) is supported, not
refused: an encoder is no predictor, so each fold pretrains on its training patients and
judges the encoder by a linear probe (the output layer trained on the fold's labelled
training patients, the trunk frozen) on its held-out patients, ε split evenly
(:mod:`server.paradigms.cv_self_supervised`, which says why); other splits and fine-tuning
are ``--paradigm transfer -P pretrain-rounds=N``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, ParadigmOption, register_paradigm

__all__ = ["HEAD_LAYERS", "PRETEXTS", "ROUNDS", "SELF_SUPERVISED", "check_encoder_model",
           "pretext_options", "stage_run_id"]

PRETEXTS = ("rotation", "masked", "contrastive")
"""The pretext tasks (``-P pretext=``)."""

HEAD_LAYERS: dict[str, str] = {"cnn": "classifier", "resnet": "fc", "densenet": "class_layers.out"}
"""Registered model -> its output layer (a ``nn.Linear`` on the penultimate features): the
trunk is everything else. Models not listed have no trunk/head split these paradigms know."""

SAMPLES = ("image-2d",)
"""Sample kinds the pretexts serve (rotations and patches of 2D images)."""


def check_encoder_model(plan: Any, paradigm: str) -> None:
    """Refuse a plan whose model has no known trunk/head split or whose samples no pretext
    serves (:class:`ConfigError` naming what would work)."""
    if plan.model not in HEAD_LAYERS:
        raise ConfigError(
            f"--paradigm {paradigm} needs a model with a trunk/head split; model "
            f"{plan.model!r} has none it knows; use --model "
            f"{' or '.join(sorted(HEAD_LAYERS))}")
    if plan.samples not in SAMPLES:
        raise ConfigError(
            f"--paradigm {paradigm}: the pretexts serve {', '.join(SAMPLES)} samples, not "
            f"{plan.samples!r}; use --samples image-2d")


def _check(plan: Any, options: Mapping[str, Any]) -> None:
    check_encoder_model(plan, "self-supervised")


def pretext_options() -> tuple[ParadigmOption, ...]:
    """The pretext's options (shared by ``self-supervised`` and ``transfer``)."""
    return (
        ParadigmOption("pretext", str, "rotation", "pretext task: rotation (4-way), masked "
                       "(reconstruct masked patches) or contrastive (SimSiam-style on one "
                       "patient's own views)", choices=PRETEXTS),
        ParadigmOption("views", int, 2, "contrastive: augmented views of one patient in its "
                       "record", minimum=2, maximum=8),
        ParadigmOption("mask-ratio", float, 0.5, "masked: share of patches masked",
                       minimum=0.1, maximum=0.9),
        ParadigmOption("patch", int, 4, "masked: side of a square patch, in pixels",
                       minimum=2, maximum=64),
    )


def stage_run_id(run_id: str, stage: str) -> str:
    """The run id of a sub-run (``pretrain``, ``scratch``, ``transfer``) of ``run_id``."""
    return f"{run_id}-{stage}"


SELF_SUPERVISED = register_paradigm(Paradigm(
    name="self-supervised",
    summary="federated pretext-task pretraining of the model's encoder on every training "
            "image (labels unused); outputs checkpoints/encoder.pt",
    options=pretext_options(),
    workflow="server.paradigms.self_supervised:run_self_supervised",
    cv=True,
    fold="server.paradigms.cv_self_supervised:run_self_supervised_fold",
    check=_check,
))

ROUNDS = register_paradigm(Paradigm(
    name="self-supervised-rounds",
    summary="stage of self-supervised/transfer: plain rounds of the pretext task (run those "
            "paradigms instead; this one writes no encoder.pt)",
    options=pretext_options(),
    node="client.paradigms.self_supervised:self_supervised_training",
    cv=False,
    check=_check,
    stage=True,
))
