"""A small decorator registry of the model zoo.

Each model family lives in its own module and registers a *builder* under a short name with
:func:`register_model`. Callers never import a family module directly: they ask
:func:`build_model` for a name taken from the run configuration, so that the set of models is
extended by adding a module, not by editing a dispatch table. Importing :mod:`common.models`
imports every family module and therefore registers every model.

Every registered model must be trainable under Opacus (no BatchNorm, no in-place operations);
the contract test suite (``tests/common/models/test_contract.py``) checks this for each entry of
:func:`list_models`.

Model contract
--------------
Every family module follows these rules, so that the trainer, the evaluator, the contract
suite and the benchmark treat all models alike:

* **Builder.** ``builder(*, in_channels, num_classes, image_size, spatial_dims) -> nn.Module``
  returns a fresh, randomly initialised module. :func:`build_model` validates the arguments,
  calls the builder and tags the module with ``module._vesalius_spec_name = name`` so that the
  trainer can find the :class:`ModelSpec` (and its ``grad_sample_mode``) of a built module.
* **Tasks** (vocabulary :data:`TASKS`): ``"classification"``, ``"segmentation"``,
  ``"reconstruction"`` (unsupervised) and ``"pretraining"`` (usable as a pretrained encoder).
* **Input kinds** (vocabulary :data:`INPUT_KINDS`): ``"image"`` (the default; a tensor
  ``[B, C, *spatial]``).
* **Forward.** A classification model maps ``[B, C, *spatial]`` to logits
  ``[B, num_classes]``; a segmentation model maps ``[B, C, *spatial]`` to per-voxel logits
  ``[B, num_classes, *spatial]``. A model registered for both classification and another
  task returns classification logits from ``forward``.
* **Optional ``dp_loss(self, inputs, targets) -> Tensor``.** A scalar: the *mean over the
  batch* of per-sample terms, each depending only on its own sample (so Opacus's per-sample
  clipping is valid). The trainer uses it when the unwrapped module defines it, else
  ``CrossEntropyLoss()(model(inputs), targets)``. Under Opacus it is called through the
  wrapped module, ``getattr(dp_model, "_module", dp_model).dp_loss(x, y)``, so every
  sub-module call goes through the hooked layers. Unsupervised models ignore ``targets``.
* **Optional ``embed(self, inputs) -> Tensor``.** Encoders (autoencoders) return features
  ``[B, F]`` usable as pretrained inputs for another classifier.
* **Opacus mode.** ``ModelSpec.grad_sample_mode`` (one of :data:`GRAD_SAMPLE_MODES`) is the
  per-sample gradient mode :func:`client.training.train_dp` uses for this model when it is
  called with ``grad_sample_mode=None``. A model with ``dp_loss`` must register ``"hooks"``,
  ``"functorch"`` or ``"direct"``: ``"ew"`` and ``"ghost"`` see only the wrapper's own
  forward/criterion, so the trainer refuses them for such models -- except ``"ghost"`` when the model also has
  the optional ``dp_loss_per_sample(self, inputs, targets) -> Tensor`` returning the ``[B]``
  per-sample terms whose mean is ``dp_loss`` (ghost clipping needs per-sample losses).
  ``"direct"`` (:mod:`client.training.per_sample`) serves every model built only of
  convolutions, ``nn.Linear`` / Opacus ``RNNLinear`` (so ``DPLSTM``/``DPGRU``) and GroupNorm,
  with or without ``dp_loss``; it clips linear layers by ghost norms (no per-sample
  gradients), convolutions and GroupNorm through one per-sample gradient buffer.
* **Opacus validity.** ``opacus.validators.ModuleValidator.validate(model, strict=True)``
  returns no errors: GroupNorm/InstanceNorm/LayerNorm instead of BatchNorm, no in-place
  operations, ``opacus.layers.DPLSTM``/``DPGRU`` instead of ``nn.LSTM``/``nn.GRU``.
* **Examples.** :func:`common.models.testing.example_batch` gives a valid
  ``(inputs, targets)`` batch for any spec (2D or 3D, class labels or segmentation masks).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from torch import nn

from common.errors import ConfigError

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

ModelBuilder = Callable[..., nn.Module]
"""A builder takes keyword arguments ``in_channels``, ``num_classes``, ``image_size`` and
``spatial_dims`` and returns a fresh, randomly initialised module."""

_B = TypeVar("_B", bound=ModelBuilder)

TASKS = ("classification", "segmentation", "reconstruction", "pretraining")
"""Task vocabulary of :attr:`ModelSpec.tasks`."""

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost", "direct")
"""Per-sample gradient modes: Opacus's (``PrivacyEngine.make_private(grad_sample_mode=...)``)
and ``"direct"``, Vesalius's engine for convolution/linear/GroupNorm models
(:mod:`client.training.per_sample`), whose clipping, noise and accounting are Opacus's."""

INPUT_KINDS = ("image",)
"""Input kinds of :attr:`ModelSpec.input_kind`: ``"image"`` is a ``[B, C, *spatial]`` tensor."""

SPEC_ATTRIBUTE = "_vesalius_spec_name"
"""Attribute :func:`build_model` sets on every built module: the registry name."""

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
    grad_sample_mode : str
        Opacus per-sample gradient mode the trainer uses for this model
        (``"hooks"``, ``"functorch"``, ``"ew"`` or ``"ghost"``).
    input_kind : str
        Kind of input the model takes (see :data:`INPUT_KINDS`).
    """

    name: str
    family: str
    spatial_dims: tuple[int, ...]
    tasks: tuple[str, ...]
    builder: ModelBuilder
    description: str
    grad_sample_mode: str = "hooks"
    input_kind: str = "image"


def register_model(
    name: str,
    *,
    family: str,
    spatial_dims: tuple[int, ...],
    tasks: tuple[str, ...],
    description: str,
    grad_sample_mode: str = "hooks",
    input_kind: str = "image",
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
        Supported learning tasks, from :data:`TASKS`; must be non-empty.
    description : str
        One-line description.
    grad_sample_mode : {"hooks", "functorch", "ew", "ghost"}, optional
        Opacus per-sample gradient mode the trainer uses for this model.
    input_kind : str, optional
        Input kind, from :data:`INPUT_KINDS`.

    Returns
    -------
    callable
        A decorator that registers the builder and returns it unchanged.

    Raises
    ------
    ConfigError
        If ``name`` is empty or already registered, a tuple argument is empty, or a task,
        mode or input kind is outside its vocabulary.
    """
    if not name:
        raise ConfigError("model name must be a non-empty string")
    if not spatial_dims or not tasks:
        raise ConfigError(f"model {name!r}: spatial_dims and tasks must be non-empty tuples")
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ConfigError(f"model {name!r}: unknown tasks {unknown}; use some of {TASKS}")
    if grad_sample_mode not in GRAD_SAMPLE_MODES:
        raise ConfigError(
            f"model {name!r}: grad_sample_mode must be one of {GRAD_SAMPLE_MODES}, "
            f"got {grad_sample_mode!r}"
        )
    if input_kind not in INPUT_KINDS:
        raise ConfigError(
            f"model {name!r}: input_kind must be one of {INPUT_KINDS}, got {input_kind!r}"
        )

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
            grad_sample_mode=grad_sample_mode,
            input_kind=input_kind,
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
        ``[B, num_classes]`` logits (classification) or ``[B, num_classes, *spatial]``
        (segmentation), tagged with ``_vesalius_spec_name = name`` (see
        :func:`spec_of`).

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
    if num_classes < 1:
        raise ConfigError(f"num_classes (the model's outputs per sample) must be >= 1, got "
                          f"{num_classes}; a task's num_outputs() says how many it needs")
    if image_size < 1:
        raise ConfigError(f"image_size must be >= 1, got {image_size}")
    model = spec.builder(
        in_channels=in_channels,
        num_classes=num_classes,
        image_size=image_size,
        spatial_dims=spatial_dims,
    )
    setattr(model, SPEC_ATTRIBUTE, name)
    return model


def spec_of(model: nn.Module) -> ModelSpec | None:
    """Return the :class:`ModelSpec` a module was built from, or None if it is not tagged.

    Looks through an Opacus ``GradSampleModule`` wrapper (``._module``).
    """
    inner = getattr(model, "_module", model)
    name = getattr(inner, SPEC_ATTRIBUTE, None)
    if not isinstance(name, str) or name not in _REGISTRY:
        return None
    return _REGISTRY[name]


def list_models() -> list[ModelSpec]:
    """Return the registered models, sorted by name."""
    return [_REGISTRY[key] for key in sorted(_REGISTRY)]


def count_parameters(model: nn.Module, *, trainable_only: bool = True) -> int:
    """Return the number of (trainable, by default) scalar parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
