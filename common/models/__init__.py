"""Model zoo: a registry plus one module per family.

Importing this package imports every family module, which registers its models; use
:func:`build_model` with a name from :func:`list_models`. The model contract every family
follows (builder signature, forward shapes, optional ``dp_loss``/``embed``, Opacus mode) is
documented in :mod:`common.models.registry`.
"""

from __future__ import annotations

import importlib
import logging

from common.models.registry import (
    GRAD_SAMPLE_MODES,
    INPUT_KINDS,
    TASKS,
    ModelBuilder,
    ModelSpec,
    build_model,
    count_parameters,
    get_spec,
    list_models,
    register_model,
    spec_of,
)

__all__ = [
    "GRAD_SAMPLE_MODES",
    "INPUT_KINDS",
    "TASKS",
    "ModelBuilder",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "get_spec",
    "list_models",
    "register_model",
    "spec_of",
]

logger = logging.getLogger(__name__)

_FAMILY_MODULES = (
    "mlp",
    "cnn",
    "resnet",
    "densenet",
    "cnn3d",
    "rnn",
    "autoencoder",
    "dsn",
    "dcelm",
    "boltzmann",
    "unet",
    "mil",
    "multi_task",
)
"""Family modules imported (and so registered) with the package, in listing order."""

_OPTIONAL_MODULES = frozenset({"dcelm", "boltzmann", "unet"})
"""Family modules developed separately; a missing one is skipped rather than fatal."""


def _import_families() -> None:
    for short in _FAMILY_MODULES:
        full = f"{__name__}.{short}"
        try:
            importlib.import_module(full)
        except ModuleNotFoundError as exc:
            # Only the absence of the optional module itself is tolerated; a missing
            # dependency *inside* it is a real error and propagates.
            if short in _OPTIONAL_MODULES and exc.name == full:
                logger.debug("model family module %s not present; skipped", full)
                continue
            raise


_import_families()
