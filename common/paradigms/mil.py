"""Multi-instance learning (MIL): a study's label for the bag of its slices.

The label in ``labels.csv`` belongs to the whole study; a node reads the study's volume
(``--samples series`` or ``volume-3d``: one series assembled along its slice normal and
resampled to ``S`` slices of ``S x S``) as a bag of ``S`` slices, and an MIL model
(``mil-attention``: attention pooling over per-slice embeddings) learns from the bag label.

DP: one bag is one patient's study, one record; the attention pooling mixes slices within a
record only, so the supervised per-sample loss stays per sample and the node's training step
is the supervised one (no node hook). The coordinator's workflow
(:func:`server.paradigms.mil.run_mil`) runs the supervised rounds and adds the report's
paradigm section. Slice attention exists only at the nodes (``vesalius node attention``). ``vesalius federation cv --paradigm mil`` runs the
same node training fold by fold (the cross-validation report has no paradigm section).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.errors import ConfigError
from common.paradigms.registry import Paradigm, register_paradigm

__all__ = ["BAG_SAMPLES", "MIL", "MIL_FAMILY", "check_mil_plan"]

MIL_FAMILY = "mil"
"""Model family (:class:`common.models.ModelSpec.family`) of the multi-instance models."""

BAG_SAMPLES = ("series", "volume-3d")
"""Sample kinds read as bags of slices."""


def check_mil_plan(plan: Any, options: Mapping[str, Any]) -> None:
    """Refuse a plan that is not an MIL model on bags of slices (:class:`ConfigError`)."""
    from common.models import list_models
    from common.models.registry import get_spec

    if get_spec(plan.model).family != MIL_FAMILY:
        names = ", ".join(s.name for s in list_models() if s.family == MIL_FAMILY)
        raise ConfigError(f"--paradigm mil needs a multi-instance model (--model {names}), "
                          f"got {plan.model!r}")
    if plan.samples not in BAG_SAMPLES:
        raise ConfigError(f"--paradigm mil reads each study as a bag of slices: use --samples "
                          f"series (or volume-3d), got {plan.samples!r}")


MIL = register_paradigm(Paradigm(
    name="mil",
    summary="multi-instance learning: each study's volume is a bag of its slices with the "
            "study's label; attention pooling over slices (attention stays at the nodes)",
    workflow="server.paradigms.mil:run_mil",
    cv=True,
    tasks=("binary", "multiclass"),
    check=check_mil_plan,
))
