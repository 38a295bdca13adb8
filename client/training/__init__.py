"""Local training and evaluation (DP-SGD with Opacus); independent of Flower."""

from __future__ import annotations

from client.training.runtime import configure_onednn_cache

# Before anything here can run a convolution: Poisson batches need a larger oneDNN primitive
# cache than its default (see client.training.runtime).
configure_onednn_cache()

from client.training.evaluate import EvalResult, evaluate
from client.training.trainer import (
    GRAD_SAMPLE_MODES,
    TrainResult,
    resolve_grad_sample_mode,
    select_device,
    train_dp,
)

__all__ = [
    "GRAD_SAMPLE_MODES",
    "EvalResult",
    "TrainResult",
    "evaluate",
    "resolve_grad_sample_mode",
    "select_device",
    "train_dp",
]
