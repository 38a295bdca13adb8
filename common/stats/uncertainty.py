"""Predictive uncertainty (MC-dropout / deep ensembles) summarised across sites.

Node side: for each held-out patient, the node has ``T`` stochastic predictions (MC-dropout
passes or ensemble members). :func:`predictive_entropy` turns them into the per-patient entropy
of the mean predictive distribution (and :func:`expected_entropy` / :func:`mutual_information`
split it into aleatoric and epistemic parts, Depeweg et al. 2018; Gal 2016, ch. 3).
:func:`entropy_node_stats` releases only the count, sum, sum of squares and a fixed-edge
histogram; :func:`entropy_summary` turns the summed statistics into the pooled mean, standard
deviation (ddof = 1) and approximate quantiles (from the histogram, to one bin width), which
equal those of the pooled per-patient entropies.

Entropies are in nats; for ``C`` classes they lie in ``[0, ln C]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from common.errors import ConfigError, DataError
from common.stats._checks import as_scores, counts_array, require_keys
from common.stats.bins import check_edges, uniform_edges, value_histogram

ENTROPY_KEYS = ("n", "sum", "sum_sq", "hist")
ENTROPY_BINS = 50
_EPS = 1e-12


def _probs(samples: npt.ArrayLike) -> np.ndarray:
    """``(T, n, C)`` probabilities; a ``(T, n)`` input is the positive-class probability."""
    p = np.asarray(samples, dtype=np.float64)
    if p.ndim == 2:
        p = np.stack([1.0 - p, p], axis=-1)
    if p.ndim != 3 or p.shape[0] < 1 or p.shape[1] < 1 or p.shape[2] < 2:
        raise DataError("predictions must have shape (passes, patients[, classes])",
                        safe_reason="invalid statistics input")
    if not np.all(np.isfinite(p)) or np.any(p < -1e-9) or np.any(p > 1 + 1e-9):
        raise DataError("predictions must be probabilities", safe_reason="invalid statistics input")
    if not np.allclose(p.sum(axis=-1), 1.0, atol=1e-6):
        raise DataError("class probabilities must sum to 1", safe_reason="invalid statistics input")
    return np.clip(p, 0.0, 1.0)


def _entropy(p: np.ndarray) -> np.ndarray:
    return -np.sum(np.where(p > 0, p * np.log(np.maximum(p, _EPS)), 0.0), axis=-1)


def predictive_entropy(samples: npt.ArrayLike) -> np.ndarray:
    """Per-patient entropy ``H[mean_t p_t]`` of the mean prediction (total uncertainty)."""
    return _entropy(_probs(samples).mean(axis=0))


def expected_entropy(samples: npt.ArrayLike) -> np.ndarray:
    """Per-patient ``mean_t H[p_t]`` (aleatoric part)."""
    return _entropy(_probs(samples)).mean(axis=0)


def mutual_information(samples: npt.ArrayLike) -> np.ndarray:
    """Per-patient ``H[mean p] - mean H[p]`` (epistemic part, BALD); >= 0."""
    return np.maximum(predictive_entropy(samples) - expected_entropy(samples), 0.0)


def entropy_edges(n_classes: int = 2, bins: int = ENTROPY_BINS) -> np.ndarray:
    """Fixed histogram edges on ``[0, ln n_classes]``."""
    if n_classes < 2:
        raise ConfigError("n_classes must be >= 2")
    return uniform_edges(bins, 0.0, math.log(n_classes))


def entropy_node_stats(
    entropies: npt.ArrayLike, *, edges: npt.ArrayLike | None = None
) -> dict[str, Any]:
    """Node-side release: ``n``, ``sum``, ``sum_sq`` and ``hist`` of per-patient entropies."""
    h = as_scores(entropies, "entropies")
    if np.any(h < -1e-12):
        raise DataError("entropies must be >= 0", safe_reason="invalid statistics input")
    e = entropy_edges() if edges is None else check_edges(edges)
    return {"n": int(h.size), "sum": float(h.sum()), "sum_sq": float(np.sum(h * h)),
            "hist": value_histogram(h, e)}


def entropy_summary(
    stats: Mapping[str, Any], *, edges: npt.ArrayLike | None = None,
    quantiles: tuple[float, ...] = (0.25, 0.5, 0.75, 0.9),
) -> dict[str, Any]:
    """Pooled mean, SD (ddof=1), histogram and histogram quantiles of the entropies.

    Quantiles are the upper edge of the bin where the cumulative count first reaches
    ``q * n`` (so within one bin width above the pooled empirical quantile).
    """
    require_keys(stats, ENTROPY_KEYS, "entropy statistics")
    n = int(stats["n"])
    if n < 1:
        raise DataError("no patients in the entropy statistics", safe_reason="no data")
    hist = counts_array(stats["hist"], "hist")
    if int(hist.sum()) != n:
        raise DataError("entropy histogram total differs from n",
                        safe_reason="invalid statistics input")
    e = entropy_edges(bins=hist.size) if edges is None else check_edges(edges)
    if e.size - 1 != hist.size:
        raise DataError("edges do not match the histogram", safe_reason="invalid statistics input")
    mean = float(stats["sum"]) / n
    var = (float(stats["sum_sq"]) - n * mean * mean) / (n - 1) if n > 1 else math.nan
    cum = np.cumsum(hist)
    qs = {f"q{round(q * 100):g}": float(e[int(np.searchsorted(cum, q * n)) + 1])
          for q in quantiles}
    return {"n": n, "mean": mean, "sd": math.sqrt(max(var, 0.0)) if n > 1 else math.nan,
            "hist": hist.tolist(), "edges": e.tolist(), "quantiles": qs}
