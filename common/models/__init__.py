"""Model zoo: a registry plus one module per family.

Importing this package imports every family module, which registers its models; use
:func:`build_model` with a name from :func:`list_models`.
"""

from __future__ import annotations

from common.models import cnn as _cnn  # noqa: F401  (registers "cnn")
from common.models.registry import (
    ModelBuilder,
    ModelSpec,
    build_model,
    count_parameters,
    get_spec,
    list_models,
    register_model,
)

__all__ = [
    "ModelBuilder",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "get_spec",
    "list_models",
    "register_model",
]
