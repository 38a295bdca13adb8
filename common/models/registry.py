"""A small decorator registry of the model zoo.

Each model family lives in its own module and registers a *builder* under a short name with
:func:`register_model`. Callers never import a family module directly: they ask
:func:`build_model` for a name taken from the run configuration, so that the set of models is
extended by adding a module, not by editing a dispatch table. Importing :mod:`common.models`
imports every family module and therefore registers every model.

Every registered model must be trainable under Opacus (no BatchNorm, no in-place operations);
the contract test suite checks this for each entry of :func:`list_models`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from common.errors import ConfigError

__all__ = [
    "ModelBuilder",
    "ModelSpec",
    "build_model",
    "count_parameters",
    "get_spec",
    "list_models",
    "register_model",
]

logger = logging.getLogger(__name__)

ModelBuilder = Callable[..., nn.Module]
"""A builder takes keyword arguments ``in_channels``, ``num_classes``, ``image_size`` and
``spatial_dims`` and returns a fresh, randomly initialised module."""

_B = TypeVar("_B", bound=ModelBuilder)

_REGISTRY: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelSpec:
    """Description of one registered model.

    Attributes
    ----------
    name : str
        Registry key, as written in the run configuration (``model = "cnn"``).
    family : str
        Model family (``"cnn"``, ``"rnn"``, ``"elm"``, ...).
    spatial_dims : tuple of int
        Image dimensionalities the builder supports (``(2,)``, ``(2, 3)``).
    tasks : tuple of str
        Learning tasks the model suits (``"classification"``, ...).
    builder : callable
        Function returning a fresh module; see :data:`ModelBuilder`.
    description : str
        One-line human description.
    """

    name: str
    family: str
    spatial_dims: tuple[int, ...]
    tasks: tuple[str, ...]
    builder: ModelBuilder
    description: str


def register_model(
    name: str,
    *,
    family: str,
    spatial_dims: tuple[int, ...],
    tasks: tuple[str, ...],
    description: str,
) -> Callable[[_B], _B]:
    """Return a decorator registering a model builder under ``name``.

    Parameters
    ----------
    name : str
        Unique registry key.
    family : str
        Model family.
    spatial_dims : tuple of int
        Supported image dimensionalities; must be non-empty.
    tasks : tuple of str
        Supported learning tasks; must be non-empty.
    description : str
        One-line description.

    Returns
    -------
    callable
        A decorator that registers the builder and returns it unchanged.

    Raises
    ------
    ConfigError
        If ``name`` is empty or already registered, or a tuple argument is empty.
    """
    if not name:
        raise ConfigError("model name must be a non-empty string")
    if not spatial_dims or not tasks:
        raise ConfigError(f"model {name!r}: spatial_dims and tasks must be non-empty tuples")

    def decorator(builder: _B) -> _B:
        if name in _REGISTRY:
            raise ConfigError(
                f"model {name!r} is already registered "
                f"(by {_REGISTRY[name].builder.__module__}); choose another name"
            )
        _REGISTRY[name] = ModelSpec(
            name=name,
            family=family,
            spatial_dims=tuple(spatial_dims),
            tasks=tuple(tasks),
            builder=builder,
            description=description,
        )
        logger.debug("registered model %r (family %s)", name, family)
        return builder

    return decorator


def get_spec(name: str) -> ModelSpec:
    """Return the :class:`ModelSpec` registered under ``name``.

    Raises
    ------
    ConfigError
        If no model is registered under ``name``; the message lists the known names.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY)) or "(none: import common.models)"
        raise ConfigError(f"unknown model {name!r}; known models: {known}") from None


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 2,
    image_size: int = 32,
    spatial_dims: int = 2,
) -> nn.Module:
    """Build a fresh instance of the model registered under ``name``.

    Parameters
    ----------
    name : str
        Registry key (see :func:`list_models`).
    in_channels : int, optional
        Image channels (1 for grey-level CT/MR/X-ray).
    num_classes : int, optional
        Number of output logits; at least 2.
    image_size : int, optional
        Side length of the (square or cubic) input images.
    spatial_dims : int, optional
        2 for images, 3 for volumes.

    Returns
    -------
    torch.nn.Module
        A module mapping ``[B, in_channels, *([image_size] * spatial_dims)]`` to
        ``[B, num_classes]`` logits.

    Raises
    ------
    ConfigError
        For an unknown name, an unsupported ``spatial_dims`` or non-positive sizes.
    """
    spec = get_spec(name)
    if spatial_dims not in spec.spatial_dims:
        raise ConfigError(
            f"model {name!r} supports spatial_dims {spec.spatial_dims}, not {spatial_dims}"
        )
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2 (binary tasks use 2 logits), got {num_classes}")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    return spec.builder(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        spatial_dims=spatial_dims,
    )


def list_models() -> list[ModelSpec]:
    """Return the registered models, sorted by name."""
    return [_REGISTRY[key] for key in sorted(_REGISTRY)]


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Return the number of (trainable, by default) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
