"""Multi-task learning: one shared trunk, a lesion-mask head and a lesion-present head.

``--paradigm multi-task --task segmentation --model multi-task-unet`` trains
:class:`common.models.multi_task.MultiTaskUNet` on the node's image/mask pairs with two tasks
at once:

* **segmentation**: the lesion mask (the segmentation task's per-sample loss: voxel-mean
  cross-entropy + soft Dice, :mod:`common.tasks.segmentation`);
* **presence**: whether the image holds any lesion (binary cross-entropy of the presence
  head), its target derived at the node from the same mask (1 where the mask has a
  foreground pixel). A hospital needs nothing beyond the masks it already has.

A record's loss is ``segmentation-weight * segmentation loss + presence-weight * presence
loss`` of that record alone: one patient (one image drawn from the patient's images) is one
DP-SGD record, and both terms depend on that record only, so per-sample clipping bounds
every patient (:func:`client.paradigms.multi_task.multi_task_training`). A weight of 0
trains the other head alone on the same trunk: the single-task arm of a comparison at equal ε.

The coordinator's workflow (:func:`server.paradigms.multi_task.run_multi_task`) runs the
rounds under the stage ``multi-task-rounds`` (the same node step), reports the segmentation
head through the pooled segmentation inference (per-patient Dice and HD95), then asks each
hospital for the presence head's per-patient-weighted score histograms on its test patients
(query :data:`QUERY`, :mod:`client.queries.multi_task`) and pools them: per-task results side
by side in the report's paradigm section.

``vesalius federation cv --paradigm multi-task`` trains both heads fold by fold with the same
node step; its report scores the segmentation head (pooled Dice per fold and over the folds,
as for any segmentation cv) and has no paradigm section: the presence head is trained but not
scored there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, ParadigmOption, register_paradigm

__all__ = ["MULTI_TASK", "MULTI_TASK_ROUNDS", "PRESENCE_HIST", "QUERY", "TASKS",
           "check_multi_task_plan", "options"]

TASKS = ("segmentation",)
NODE_HOOK = "client.paradigms.multi_task:multi_task_training"

QUERY = "multi-task-presence"
"""The node query releasing the presence head's test histograms."""

PRESENCE_HIST = "presence-hist"
"""Released ``(2, B)``: per-patient-weighted image counts, lesion / no lesion, per score bin."""

FAMILY = "multi-task"
"""Model family of the trunk-plus-heads models (:mod:`common.models.multi_task`)."""


def options() -> tuple[ParadigmOption, ...]:
    """The options of the paradigm (and of its stage)."""
    return (
        ParadigmOption("segmentation-weight", float, 1.0, "weight of the segmentation head's "
                       "per-sample loss (cross-entropy + soft Dice)", minimum=0.0, maximum=100.0),
        ParadigmOption("presence-weight", float, 0.5, "weight of the lesion-present head's "
                       "per-sample cross-entropy", minimum=0.0, maximum=100.0),
    )


def check_multi_task_plan(plan: Any, options: Mapping[str, Any]) -> None:
    """Refuse a plan the paradigm cannot train (:class:`ConfigError`, one actionable sentence)."""
    from common.models import list_models
    from common.models.registry import get_spec

    if plan.task not in TASKS:
        raise ConfigError(f"--paradigm multi-task learns lesion masks and lesion presence from "
                          f"the node's image/mask pairs: use --task segmentation, not "
                          f"{plan.task!r}")
    if get_spec(plan.model).family != FAMILY:
        names = ", ".join(s.name for s in list_models() if s.family == FAMILY)
        raise ConfigError(f"--paradigm multi-task needs a model with one trunk and several heads "
                          f"(--model {names}), got {plan.model!r}")
    if plan.samples != "image-2d":
        raise ConfigError("--paradigm multi-task reads 2D image/mask pairs: use --samples "
                          f"image-2d, not {plan.samples!r}")
    if options.get("segmentation-weight", 1.0) == 0 and options.get("presence-weight", 0.5) == 0:
        raise ConfigError("segmentation-weight and presence-weight are both 0, so nothing "
                          "would be learned: give at least one of them a value above 0")


MULTI_TASK = register_paradigm(Paradigm(
    name="multi-task",
    summary="one shared U-Net trunk, two heads: the lesion mask and whether the image holds "
            "a lesion; weighted per-sample losses; per-task metrics and pooled inference",
    options=options(),
    workflow="server.paradigms.multi_task:run_multi_task",
    node=NODE_HOOK,
    cv=True,
    tasks=TASKS,
    check=check_multi_task_plan,
))

MULTI_TASK_ROUNDS = register_paradigm(Paradigm(
    name="multi-task-rounds",
    summary="stage of multi-task: its training rounds (run --paradigm multi-task instead)",
    options=options(),
    node=NODE_HOOK,
    cv=False,
    tasks=TASKS,
    check=check_multi_task_plan,
    stage=True,
))
