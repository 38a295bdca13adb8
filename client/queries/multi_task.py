"""Query ``multi-task-presence``: the presence head's score histograms on held-out patients.

It serves plans of ``--paradigm multi-task`` (:mod:`common.paradigms.multi_task`): the model
in the message is a :class:`common.models.multi_task.MultiTaskUNet`; for every held-out image
the node computes, and keeps, the presence head's probability that the image holds a lesion
and the image's true presence (its mask has a foreground pixel). It releases:

``presence-hist`` (2, B)
    Row 0 over the images with a lesion, row 1 over those without; bin ``j`` of ``B`` equal
    bins on [0, 1] (``value-bins``) holds the sum over the images scored in it of ``1 /
    n_p``, ``n_p`` the number of images of the image's patient. Each patient therefore
    weighs 1 in total, however many images it has: the L2 sensitivity per patient is 1
    (non-negative entries summing to 1), and pooled statistics are patient-weighted.
``num-examples``
    The patient count (sensitivity 1).

Fine histograms: released only where the hospital consents (``release-histograms``), like
the score histograms of the other image queries.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from client.queries.metrics import int_param
from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import HeldOutImages, load_model
from client.release import Statistic
from common import messages as k
from common.errors import ConfigError, DataError
from common.paradigms.multi_task import PRESENCE_HIST, QUERY

__all__ = ["PresenceQuery", "SCORE_BINS", "presence_histograms"]

SCORE_BINS = 1000
"""Default bins of the presence histograms."""


def presence_histograms(scores: np.ndarray, present: np.ndarray, patient_index: np.ndarray,
                        bins: int) -> np.ndarray:
    """``(2, bins)`` patient-weighted histograms (see the module docstring).

    Parameters
    ----------
    scores : ndarray, shape (N,)
        Per-image presence probabilities in [0, 1].
    present : ndarray, shape (N,)
        Per-image truth (1 = the image holds a lesion).
    patient_index : ndarray, shape (N,)
        The image's patient.
    bins : int
        Equal bins on [0, 1] (a score of 1 falls in the last).
    """
    _, inverse, counts = np.unique(patient_index, return_inverse=True, return_counts=True)
    weight = 1.0 / counts[inverse]
    idx = np.clip(np.floor(np.clip(scores, 0.0, 1.0) * bins).astype(int), 0, bins - 1)
    lesion = np.asarray(present).astype(bool)
    return np.stack([np.bincount(idx[lesion], weights=weight[lesion], minlength=bins),
                     np.bincount(idx[~lesion], weights=weight[~lesion], minlength=bins)])


def _presence_scores(model: torch.nn.Module, images: torch.Tensor,
                     device: torch.device) -> np.ndarray:
    from common.models.multi_task import is_multi_task_model

    if not is_multi_task_model(model):
        raise ConfigError(f"query {QUERY!r} without a multi-task model",
                          safe_reason=f"malformed query: {QUERY!r} needs a multi-task model")
    model = model.to(device).eval()
    out = [model.presence_probability(images[i:i + 64].to(device)).double().cpu()
           for i in range(0, len(images), 64)]
    scores = torch.cat(out).numpy() if out else np.zeros(0)
    if not np.all(np.isfinite(scores)):
        raise DataError("non-finite scores", safe_reason="the model produced non-finite scores")
    return scores


@register_query(QUERY)
class PresenceQuery(Query):
    """Patient-weighted presence-head histograms (see the module docstring)."""

    source = "images"

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        if req.plan.task != "segmentation":
            raise ConfigError(f"query {QUERY!r} with a {req.plan.task} plan",
                              safe_reason=f"malformed query: {QUERY!r} serves multi-task "
                              "plans of the segmentation task")
        if not req.node.release_histograms:
            raise ConfigError("presence histograms without consent",
                              safe_reason="refused: this node does not release fine "
                              "histograms (release-histograms is off)")
        bins = int_param(req, k.VALUE_BINS, SCORE_BINS, lo=2, hi=100_000)
        return [Statistic(k.NUM_EXAMPLES, 1.0, integer=True),
                Statistic(PRESENCE_HIST, 1.0, (2, bins))]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        if not isinstance(data, HeldOutImages):
            raise ConfigError(f"{QUERY} needs held-out images")
        split = data.split
        scores = _presence_scores(load_model(req, k.ARRAYS), split.images, data.device)
        present = (split.labels.flatten(1) >= 1).any(dim=1).cpu().numpy()
        index = split.patient_index.reshape(-1).cpu().numpy()
        bins = int_param(req, k.VALUE_BINS, SCORE_BINS, lo=2, hi=100_000)
        return {k.NUM_EXAMPLES: int(len(np.unique(index))),
                PRESENCE_HIST: presence_histograms(scores, present, index, bins)}
