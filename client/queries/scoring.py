"""Per-patient scores of the held-out images, for the image queries (kept on the node).

A patient's score is the mean of its images' class-1 probabilities and its label the maximum
of its images' labels (:func:`client.training.evaluate`). Scores never leave the node: queries
turn them into sums.

The binary queries (:func:`patient_scores`, :func:`patient_samples`) serve plans of the
``binary`` task and refuse others; multi-class queries read the K class probabilities per
patient (:func:`patient_probabilities`).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord

from client.queries.registry import QueryRequest
from client.training import evaluate as evaluate_model
from common import messages as k
from common.errors import ConfigError, DataError
from common.stats.calibration import apply_calibration

if TYPE_CHECKING:
    from client.data import SplitArrays

__all__ = ["HeldOutImages", "calibrated_scores", "calibration_coefficients", "load_model", "model_arrays",
           "patient_outputs", "patient_probabilities", "patient_samples",
           "patient_scores"]


@dataclass(frozen=True, eq=False)
class HeldOutImages:
    """The held-out images a query scores (kept on the node).

    Attributes
    ----------
    split : client.data.SplitArrays
        Images, labels and patient index of the held-out split.
    device : torch.device
        Where models are run.
    """

    split: SplitArrays
    device: torch.device


def model_arrays(req: QueryRequest, key: str) -> ArrayRecord:
    """The ArrayRecord ``key`` of the message, or a clear refusal."""
    record = req.content.get(key)
    if not isinstance(record, ArrayRecord):
        raise ConfigError(f"query {req.name!r} without model arrays {key!r}",
                          safe_reason=f"malformed query: {req.name!r} needs model arrays {key!r}")
    return record


def _model(req: QueryRequest, arrays: ArrayRecord) -> torch.nn.Module:
    # Imported here: client.app imports the query handler, which imports this module.
    from client.app import build_plan_model

    model = build_plan_model(req.plan)
    model.load_state_dict(arrays.to_torch_state_dict())
    return model


def load_model(req: QueryRequest, key: str) -> torch.nn.Module:
    """The plan's model (task outputs, sample kind) with the weights of record ``key``."""
    return _model(req, model_arrays(req, key))


def patient_outputs(
    req: QueryRequest, data: HeldOutImages, key: str, *, batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """``(predictions, targets)`` per held-out patient for the model in ``key``, any task.

    Each sample's prediction is :meth:`common.tasks.Task.predict` of the model's outputs
    (run in eval mode, no gradient); :meth:`common.tasks.Task.patient_prediction` then
    aggregates samples to patients (patients in sorted order): e.g. mean probabilities and
    maximum labels (classification), mean value and mean target (regression). Non-finite
    predictions are refused.
    """
    from client.app import plan_task

    task = plan_task(req.plan)
    split, device = data.split, data.device
    model = load_model(req, key).to(device)
    model.eval()
    preds = []
    with torch.no_grad():
        for start in range(0, len(split.images), batch_size):
            out = model(split.images[start:start + batch_size].to(device))
            preds.append(task.predict(out).double().cpu())
    predictions = torch.cat(preds).numpy()
    if not np.all(np.isfinite(predictions)):
        raise DataError("non-finite predictions",
                        safe_reason="the model produced non-finite predictions")
    return task.patient_prediction(predictions, split.labels.cpu().numpy(),
                                   split.patient_index.reshape(-1).cpu().numpy())


def _require_task(req: QueryRequest, task: str) -> None:
    if req.plan.task != task:
        raise ConfigError(
            f"query {req.name!r} serves the {task} task, not {req.plan.task}",
            safe_reason=f"malformed query: {req.name!r} serves the {task} task, the plan "
            f"names {req.plan.task}",
        )


#: Scores of the last few (plan, model, held-out split) in this process. The statistics after
#: a run ask one final model many queries (each Newton step of a fit is one), and each scored
#: the whole split again (36 scorings for 6 in a 3-hospital run; the time saved grows with the
#: split, and was within noise at 8 test patients per hospital: bench/RESULTS.md).
#: Keyed by content digests, so another model, plan or split is a miss, never a stale hit.
#: The scores stay in the node's memory, like the split they come from.
SCORE_CACHE_SIZE = 8
_score_cache: OrderedDict[str, tuple[np.ndarray, np.ndarray]] = OrderedDict()
_score_lock = threading.Lock()


def _score_key(req: QueryRequest, data: HeldOutImages, arrays: ArrayRecord) -> str:
    digest = hashlib.sha256(repr(req.plan).encode())
    digest.update(str(data.device).encode())
    for name in sorted(arrays.keys()):
        array = arrays[name]
        digest.update(f"\0{name}\0{array.dtype}\0{tuple(array.shape)}\0".encode())
        digest.update(array.data)
    split = data.split
    for tensor in (split.images, split.labels, split.patient_index):
        flat = tensor.detach().cpu().contiguous()
        digest.update(f"\0{flat.dtype}\0{tuple(flat.shape)}\0".encode())
        digest.update(flat.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _evaluated(req: QueryRequest, data: HeldOutImages, key: str) -> tuple[np.ndarray, np.ndarray]:
    from client.app import plan_task

    arrays = model_arrays(req, key)
    cache_key = _score_key(req, data, arrays)
    with _score_lock:
        hit = _score_cache.get(cache_key)
        if hit is not None:
            _score_cache.move_to_end(cache_key)
            return hit[0].copy(), hit[1].copy()
    split, device = data.split, data.device
    res = evaluate_model(_model(req, arrays), split.images, split.labels,
                         patient_index=split.patient_index, device=device,
                         task=plan_task(req.plan), num_classes=req.plan.num_classes)
    if not (np.all(np.isfinite(res.scores)) and math.isfinite(res.loss)):
        raise DataError("non-finite scores", safe_reason="the model produced non-finite scores")
    with _score_lock:
        _score_cache[cache_key] = (res.scores.copy(), res.labels.copy())
        while len(_score_cache) > SCORE_CACHE_SIZE:
            _score_cache.popitem(last=False)
    return res.scores, res.labels


def patient_scores(
    req: QueryRequest, data: HeldOutImages, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, labels)`` per held-out patient for the model in record ``key`` (binary)."""
    _require_task(req, "binary")
    return _evaluated(req, data, key)


def patient_probabilities(
    req: QueryRequest, data: HeldOutImages, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (patients, K), labels)`` for the model in ``key`` (multi-class)."""
    _require_task(req, "multiclass")
    return _evaluated(req, data, key)


def patient_samples(
    req: QueryRequest, data: HeldOutImages, keys: list[str], *, passes: int
) -> np.ndarray:
    """``(T, n_patients)`` class-1 probabilities: ``passes`` stochastic (MC-dropout) forward
    passes of each model in ``keys`` (``passes=1`` for a deep ensemble)."""
    _require_task(req, "binary")
    split, device = data.split, data.device
    index = split.patient_index.reshape(-1).cpu().numpy()
    _, inverse = np.unique(index, return_inverse=True)
    counts = np.bincount(inverse)
    rows = []
    for key in keys:
        model = _model(req, model_arrays(req, key)).to(device)
        model.train(passes > 1)  # dropout active only for MC-dropout; GroupNorm has no state
        with torch.no_grad():
            for _ in range(passes):
                probs = []
                for start in range(0, len(split.images), 256):
                    logits = model(split.images[start:start + 256].to(device))
                    probs.append(torch.softmax(logits, dim=1)[:, 1].double().cpu())
                img = torch.cat(probs).numpy()
                rows.append(np.bincount(inverse, weights=img) / counts)
    out = np.vstack(rows)
    if not np.all(np.isfinite(out)):
        raise DataError("non-finite scores", safe_reason="the model produced non-finite scores")
    return out


MAX_CALIBRATION_COEF = 1e6


def calibration_coefficients(req: QueryRequest) -> tuple[float, float] | None:
    """The recalibration map ``[intercept, slope]`` a ``metrics``/``placements`` query carries.

    Sent in the config's ``beta`` (the coefficients of the calibration GLM the coordinator
    fitted with ``calibration-glm``); ``None`` when absent (the model's own scores).
    """
    raw = req.config.get(k.BETA)
    if raw is None:
        return None
    values = np.asarray(raw if isinstance(raw, list) else [], dtype=np.float64)
    if (values.shape != (2,) or not np.all(np.isfinite(values))
            or np.any(np.abs(values) > MAX_CALIBRATION_COEF)):
        raise ConfigError(
            "calibration coefficients must be two finite numbers",
            safe_reason="malformed query: 'beta' (calibration intercept and slope) must hold "
            f"two finite numbers of magnitude <= {MAX_CALIBRATION_COEF:g}",
        )
    return float(values[0]), float(values[1])


def calibrated_scores(req: QueryRequest, scores: np.ndarray) -> np.ndarray:
    """``scores`` through the query's recalibration map, if it carries one.

    The map ``expit(a + b logit(s))`` keeps every score a probability in [0, 1], so the
    per-patient sensitivities a query declares for scores hold unchanged.
    """
    coef = calibration_coefficients(req)
    return scores if coef is None else apply_calibration(scores, *coef)
