"""Initialise a model from another run's checkpoint: pretrain, then fine-tune (``init-from``).

A coordinator saves its final global model as ``checkpoints/final.pt``, a ``torch.save`` of
the model's state dict. :func:`init_from` loads such a file into a model built for another
task or head: every tensor whose name and shape match the model's is copied, every other one
is skipped (a classification head of another width, a layer the new model does not have), and
the model's own tensors that the file does not provide keep their initial values. The typical
use is a self-supervised ``reconstruction`` run (autoencoder, DBN, DBM) followed by a
supervised run of the same model that starts from its pretrained encoder.

The file is read with ``torch.load(..., weights_only=True)`` (tensors and plain containers
only, no arbitrary pickled code), and its SHA-256 is recorded in the :class:`InitReport`, so
that a run's report says which weights it started from.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.errors import ConfigError

__all__ = ["InitReport", "init_from"]

logger = logging.getLogger(__name__)

_SAFE = "refused: the init-from checkpoint cannot initialise the model"


@dataclass(frozen=True)
class InitReport:
    """What :func:`init_from` loaded.

    Attributes
    ----------
    sha256 : str
        Hex SHA-256 of the checkpoint file's bytes.
    loaded : tuple of str
        Names of the tensors copied into the model (same name and shape).
    skipped : tuple of str
        Names of the file's tensors not copied: no tensor of that name in the model, or one
        of another shape (e.g. a head of another width).
    kept : tuple of str
        Names of the model's tensors the file did not provide; they keep their initial values.
    """

    sha256: str
    loaded: tuple[str, ...]
    skipped: tuple[str, ...]
    kept: tuple[str, ...]

    @property
    def num_loaded(self) -> int:
        """Number of tensors copied into the model."""
        return len(self.loaded)

    @property
    def num_skipped(self) -> int:
        """Number of the file's tensors not copied."""
        return len(self.skipped)


def _read(path: Path) -> tuple[bytes, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"init-from checkpoint {str(path)!r} does not exist; give the path of an earlier "
            "run's checkpoints/final.pt", safe_reason=_SAFE) from None
    except OSError as exc:
        raise ConfigError(
            f"init-from checkpoint {str(path)!r} cannot be read ({type(exc).__name__}); give "
            "a readable file such as an earlier run's checkpoints/final.pt",
            safe_reason=_SAFE) from None
    return data, hashlib.sha256(data).hexdigest()


def _state_dict(data: bytes, path: Path) -> dict[str, torch.Tensor]:
    """The file's state dict: a mapping of names to tensors, or a ConfigError saying why not."""
    what = (f"init-from checkpoint {str(path)!r} is not a PyTorch state dict; give a file "
            "saved as torch.save(model.state_dict()), such as an earlier run's "
            "checkpoints/final.pt")
    try:
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001  # any unreadable or unsafe pickle is the same refusal
        raise ConfigError(what, safe_reason=_SAFE) from None
    if not isinstance(loaded, Mapping) or not loaded or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items()
    ):
        raise ConfigError(what, safe_reason=_SAFE)
    return dict(loaded)


def _check_finite(name: str, tensor: torch.Tensor, path: Path) -> None:
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise ConfigError(
            f"init-from checkpoint {str(path)!r} holds NaN or infinite values in {name!r} "
            "(did its training diverge?); give a checkpoint of a run that converged",
            safe_reason=_SAFE)


def init_from(model: nn.Module, checkpoint_path: str | Path) -> InitReport:
    """Copy into ``model`` every tensor of a checkpoint whose name and shape match.

    Parameters
    ----------
    model : torch.nn.Module
        The model to initialise (modified in place), e.g. a classifier built for the
        fine-tuning task.
    checkpoint_path : str or pathlib.Path
        A ``torch.save`` of a state dict, e.g. an earlier run's ``checkpoints/final.pt``.

    Returns
    -------
    InitReport
        The file's SHA-256 and the names of the tensors loaded, skipped and kept.

    Raises
    ------
    ConfigError
        When the file is missing or unreadable, is not a state dict (read with
        ``weights_only=True``), no tensor of it matches the model by name and shape, or a
        tensor to load is not finite. The ``safe_reason`` names no path.
    """
    path = Path(checkpoint_path)
    data, digest = _read(path)
    source = _state_dict(data, path)
    target = model.state_dict()
    loaded = {name: tensor for name, tensor in source.items()
              if name in target and tensor.shape == target[name].shape}
    if not loaded:
        example = ", ".join(list(target)[:3])
        raise ConfigError(
            f"no tensor of init-from checkpoint {str(path)!r} matches the model by name and "
            f"shape (the model has {example}, ...; the file has {', '.join(list(source)[:3])}, "
            "...); initialise from a checkpoint of the same model architecture",
            safe_reason=_SAFE)
    for name, tensor in loaded.items():
        _check_finite(name, tensor, path)
    model.load_state_dict(loaded, strict=False)
    report = InitReport(
        sha256=digest,
        loaded=tuple(loaded),
        skipped=tuple(name for name in source if name not in loaded),
        kept=tuple(name for name in target if name not in loaded),
    )
    logger.info("init-from %s (sha256 %s): %d tensors loaded, %d skipped (%s), %d kept",
                path.name, digest[:12], report.num_loaded, report.num_skipped,
                ", ".join(report.skipped) or "none", len(report.kept))
    return report

