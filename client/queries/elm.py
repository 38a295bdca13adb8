"""``elm-readout``: a DC-ELM's readout statistics over the node's *training* patients.

The extreme-learning-machine readout of :class:`common.models.dcelm.DCELM` is solved in closed
form, ``beta = (H^T H + ridge I)^-1 H^T Y``, and both sums add up across hospitals: the
coordinator sums every node's ``H^T H`` and ``H^T Y`` and solves once, which equals the pooled
solution (see :func:`server.inference.federated_elm_readout`).

Privacy: each patient's feature rows are scaled so that the sum of their L2 norms is at most
``clip`` (:func:`common.models.dcelm.readout_row_scale`), so adding or removing one patient
changes ``H^T H`` by at most ``clip**2`` and ``H^T Y`` by at most ``clip`` (Frobenius norm;
the derivation is in :func:`common.models.dcelm.noisy_statistics`). Those are the declared
sensitivities. The row count is not released (its sensitivity is a patient's number of
images, unbounded).

Unlike the held-out statistics, these are sums over the patients a *private* plan promises to
protect, so a private plan sets their noise as it sets DP-SGD's: the plan's noise multiplier,
or the one whose single Gaussian release meets the plan's target epsilon
(:meth:`ElmReadoutQuery.noise_multiplier`); the node adds it, charges its ledger and refuses
a release past its cap (:mod:`client.release`). A non-private plan gets the node's own
``stats-noise-multiplier``, or an exact release (level "exact" on the ledger) only where the
node consents to baselines (``allow-non-private``), as for non-private training
(:func:`client.budget.decide`). The feature filters and that policy are checked before any
image is read.
"""

from __future__ import annotations

import math
from typing import Any

from client.queries.registry import Query, QueryRequest, register_query
from client.queries.scoring import _model, model_arrays
from client.release import Statistic
from common import messages as k
from common.errors import BudgetExceededError, ConfigError

__all__ = ["ElmReadoutQuery", "readout_dimensions"]


def _clip(req: QueryRequest) -> float:
    clip = float(req.config.get(k.ELM_CLIP, 1.0))  # type: ignore[arg-type]
    if not (math.isfinite(clip) and clip > 0):
        raise ConfigError(f"elm clip must be > 0, got {clip}",
                          safe_reason="malformed query: 'elm-clip' must be a positive number")
    return clip


def readout_dimensions(req: QueryRequest) -> tuple[int, int]:
    """``(d, k)``: feature width (with the bias column) and classes of the plan's DC-ELM."""
    model = _model(req, model_arrays(req, k.ARRAYS))
    if not hasattr(model, "readout_statistics"):
        raise ConfigError(f"model {req.plan.model!r} has no closed-form readout",
                          safe_reason="malformed query: 'elm-readout' needs model 'dc-elm'")
    readout: Any = getattr(model, "readout")  # noqa: B009 - the DC-ELM's linear readout
    return int(readout.weight.shape[1]), int(readout.weight.shape[0])


def _check_fixed_features(req: QueryRequest, model: Any) -> None:
    """Refuse feature filters other than the seeded ones every hospital builds itself.

    The filters are fixed by :data:`common.models.dcelm.FEATURE_SEED`; a coordinator sending
    its own could choose features that single out patients in an exact release.
    """
    import torch

    from common.models import build_model

    own = build_model(req.plan.model, in_channels=1, num_classes=2,
                      image_size=req.plan.image_size).state_dict()
    sent = model.state_dict()
    for name, tensor in own.items():
        if not name.startswith("readout") and not torch.equal(tensor, sent[name]):
            raise ConfigError(
                f"elm-readout with feature tensor {name} not the seeded one",
                safe_reason="refused: the DC-ELM feature filters differ from the seeded ones "
                "every hospital builds",
            )


def _check_release_policy(req: QueryRequest) -> None:
    """Refuse an exact (un-noised) release of training sums the node has not consented to.

    ``H^T H`` and ``H^T Y`` over the training patients are what a private plan's guarantee
    covers; released exactly they carry no DP guarantee at all. A node that does not noise its
    statistics (``stats-noise-multiplier = 0``) therefore answers only a non-private plan, and
    only when it allows non-private baselines.
    """
    if req.plan.private or req.node.stats_noise_multiplier > 0:
        return  # noised: by the plan's epsilon (ElmReadoutQuery.noise_multiplier) or the node
    if not req.node.allow_non_private:
        raise BudgetExceededError(
            "exact elm-readout of training patients but the node requires DP",
            safe_reason="refused: this node only releases training statistics with differential "
            "privacy (set stats-noise-multiplier > 0, or allow-non-private=true for baselines)",
        )


@register_query("elm-readout")
class ElmReadoutQuery(Query):
    """Sums ``H^T H`` and ``H^T Y`` over the node's training patients (split "train")."""

    source = "images"
    splits = (k.SPLIT_TRAIN,)

    def statistics(self, req: QueryRequest) -> list[Statistic]:
        if req.split != k.SPLIT_TRAIN:
            raise ConfigError("elm-readout on a held-out split",
                              safe_reason="malformed query: 'elm-readout' uses split 'train'")
        d, classes = readout_dimensions(req)
        clip = _clip(req)
        # Before any image is read: crafted filters and unconsented exact releases.
        _check_fixed_features(req, _model(req, model_arrays(req, k.ARRAYS)))
        _check_release_policy(req)
        return [Statistic(k.ELM_HTH, clip * clip, (d, d)),
                Statistic(k.ELM_HTY, clip, (d, classes))]

    def compute(self, req: QueryRequest, data: Any) -> dict[str, Any]:
        model = _model(req, model_arrays(req, k.ARRAYS))
        _check_fixed_features(req, model)  # cheap; the arrays are the ones checked above
        model = model.to(data.device)
        split = data.split
        hth, hty, _ = model.readout_statistics(  # type: ignore[operator]
            split.images.to(data.device), split.labels, clip=_clip(req),
            patient_index=split.patient_index,
        )
        return {k.ELM_HTH: hth.cpu().numpy(), k.ELM_HTY: hty.cpu().numpy()}

    def noise_multiplier(self, req: QueryRequest, num_patients: int) -> float | None:
        """Under a private plan, the noise the plan's epsilon sets for this one release.

        The readout is the run's only training release, so it is calibrated like DP-SGD: the
        plan's ``noise-multiplier`` when given, else the smallest multiplier whose single
        Gaussian release (both sums together, one step, every training patient) stays within
        the plan's ``target-epsilon`` at the node's delta
        (:func:`common.privacy.plan_noise_multiplier`). The guard then charges the node's
        ledger and refuses a release past its cap. A non-private plan: the node's own setting.
        """
        if not req.plan.private:
            return None
        from common.privacy import default_delta, plan_noise_multiplier

        statistics = math.sqrt(2.0)  # two statistics compose to one mechanism of sigma / sqrt 2
        if req.plan.noise_multiplier > 0:
            return float(req.plan.noise_multiplier) * statistics
        delta = req.plan.target_delta or default_delta(max(num_patients, 1))
        sigma = plan_noise_multiplier(target_epsilon=req.plan.target_epsilon, delta=delta,
                                      sample_rate=1.0, steps=1)
        return float(sigma) * statistics
