"""Process-wide CPU runtime settings for training, applied when :mod:`client.training` is imported.

oneDNN (the library behind PyTorch's CPU convolutions) caches one compiled *primitive* per
layer, direction and input shape, and keeps at most ``ONEDNN_PRIMITIVE_CACHE_CAPACITY`` of
them (1024 by default). DP-SGD draws Poisson batches, so every step has a different batch
size: a model with a few dozen convolutions (the zoo's DenseNet has 15, each needing forward,
input-gradient and per-sample weight-gradient primitives) over the few dozen batch sizes an
epoch draws needs several thousand, and at 1024 the cache evicts and recompiles on almost
every step. Non-private training uses fixed-size batches and never notices. Measured on the
federated PneumoniaMNIST benchmark (3 sites, densenet, 4 rounds x 2 epochs, 2-core CPU): the
DP/non-DP epoch-time ratio is 2.37 at the default capacity, 1.89 at 4096 and 1.85 at 16384,
with the same accuracy and no more peak memory (see ``bench/RESULTS.md``).

A larger cache is not free: a cached primitive keeps memory, and a process that sees hundreds
of different batch sizes (not Poisson sampling around one expected size, which draws a few
dozen) grew by 0.35 GB at 4096 and 0.7 GB at 16384 in a stress run over 280 sizes. 4096 holds
a zoo model's primitives for the batch sizes of an expected batch of 64-256.

oneDNN reads the setting once, when it creates its first primitive, and PyTorch offers no
call to change it later, so it has to be in the environment before the process's first
convolution. :func:`configure_onednn_cache` only fills it in when the operator has not set it
(under either of oneDNN's names), so an explicit setting always wins.
"""

from __future__ import annotations

import os

__all__ = ["ONEDNN_CACHE_CAPACITY", "ONEDNN_CACHE_ENV", "configure_onednn_cache"]

ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
_LEGACY_ENV = "DNNL_PRIMITIVE_CACHE_CAPACITY"  # oneDNN's older name, still honoured by it
ONEDNN_CACHE_CAPACITY = 4096
"""Default primitive-cache capacity for training processes (oneDNN's own default is 1024)."""


def configure_onednn_cache(capacity: int = ONEDNN_CACHE_CAPACITY) -> str:
    """Set oneDNN's primitive-cache capacity unless the environment already sets it.

    Returns the value now in the environment (the operator's, if set). oneDNN reads it once,
    at the process's first CPU convolution: in a process that has already run one, neither
    this call nor the operator's value changes the capacity any more.
    """
    if capacity < 0:
        raise ValueError(f"capacity must be >= 0, got {capacity}")
    for name in (ONEDNN_CACHE_ENV, _LEGACY_ENV):
        if os.environ.get(name):
            return os.environ[name]
    os.environ[ONEDNN_CACHE_ENV] = str(capacity)
    return os.environ[ONEDNN_CACHE_ENV]
