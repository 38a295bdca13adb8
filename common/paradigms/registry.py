"""The registry of learning paradigms: what ``vesalius federation run --paradigm NAME`` selects.

A *task* (:mod:`common.tasks`) says what one sample's target and per-sample loss are; a
*paradigm* says how a federation learns with it: plain supervised rounds (the default), a
pretext task before fine-tuning, labelled plus unlabelled patients, several heads, bags of
instances, several models. Each paradigm lives in its own module of :mod:`common.paradigms`,
which declares it here with :func:`register_paradigm`; the package imports every module in it,
so a paradigm is added by adding a module, never by editing a dispatch table.

A declaration is light (no torch import): the coordinator's workflow and the node's training
hook are named by ``"module:function"`` paths and imported only when a run uses them:

``workflow`` (coordinator)
    ``workflow(grid, config, *, on_round, on_progress) -> server.report.RunReport``: the whole
    run, as :func:`server.app.run_federation` does for supervised rounds. "" keeps those.
``node`` (hospital)
    ``node(plan, task, split, data, options) -> client.paradigms.NodeTraining``: the dataset,
    the losses and the model preparation one local training step uses under this paradigm.
    "" keeps the supervised ones (:func:`client.paradigms.supervised_training`).

Options are typed ``KEY=VALUE`` pairs (``--paradigm-option``), checked here against the
declaration and sent to every node as one canonical JSON text in the plan
(``paradigm-options``), so that a node and the coordinator read the same values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from common.errors import ConfigError

__all__ = [
    "DEFAULT_PARADIGM",
    "Paradigm",
    "ParadigmOption",
    "canonical_options",
    "get_paradigm",
    "list_paradigms",
    "load_path",
    "parse_option_pairs",
    "read_options",
    "register_paradigm",
]

DEFAULT_PARADIGM = "supervised"

_KINDS: dict[type, str] = {int: "integer", float: "number", str: "text", bool: "true/false"}


@dataclass(frozen=True)
class ParadigmOption:
    """One typed option of a paradigm.

    Parameters
    ----------
    name : str
        Kebab-case key (``--paradigm-option NAME=VALUE``).
    kind : type
        ``int``, ``float``, ``str`` or ``bool``.
    default : Any
        Value when the option is not given (of type ``kind``).
    help : str
        One sentence for ``vesalius federation paradigms``.
    choices : tuple
        Allowed values (empty: any value of ``kind`` within the bounds).
    minimum, maximum : float, optional
        Inclusive bounds of a number.
    """

    name: str
    kind: type
    default: Any
    help: str
    choices: tuple[Any, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise TypeError(f"option {self.name!r}: kind must be int, float, str or bool")

    def convert(self, value: Any) -> Any:
        """``value`` (text from the command line, or a JSON value) as this option's type.

        Raises
        ------
        ConfigError
            The value has the wrong type, is not among the choices or out of bounds.
        """
        expected = f"{self.name} must be {_KINDS[self.kind]}"
        try:
            if self.kind is bool:
                if isinstance(value, bool):
                    out: Any = value
                elif str(value).lower() in {"true", "1", "yes", "on"}:
                    out = True
                elif str(value).lower() in {"false", "0", "no", "off"}:
                    out = False
                else:
                    raise ValueError
            elif self.kind is int:
                if isinstance(value, float) and not value.is_integer():
                    raise ValueError
                out = int(value)
            elif self.kind is float:
                out = float(value)
                if not math.isfinite(out):
                    raise ValueError
            else:
                out = str(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{expected}, got {value!r}") from None
        if self.choices and out not in self.choices:
            raise ConfigError(f"{self.name} must be one of "
                              f"{', '.join(map(str, self.choices))}, got {out!r}")
        if self.minimum is not None and out < self.minimum:
            raise ConfigError(f"{self.name} must be >= {self.minimum:g}, got {out!r}")
        if self.maximum is not None and out > self.maximum:
            raise ConfigError(f"{self.name} must be <= {self.maximum:g}, got {out!r}")
        return out


@dataclass(frozen=True)
class Paradigm:
    """A learning paradigm a federation can run.

    Parameters
    ----------
    name : str
        ``--paradigm`` value.
    summary : str
        One line for ``vesalius federation paradigms`` and the report.
    options : tuple of ParadigmOption
        Its settings (``--paradigm-option KEY=VALUE``).
    workflow : str
        ``"module:function"`` of the coordinator's workflow ("" = supervised rounds).
    node : str
        ``"module:function"`` of the node's training hook ("" = supervised training).
    cv : bool
        Whether ``vesalius federation cv`` can run it.
    fold : str
        ``"module:function"`` training one cross-validation fold under this paradigm, with
        :func:`server.cv.run_fold`'s signature (``fold(grid, config, outcome, *, train_nodes,
        heldout_nodes, progress, num_folds, secure) -> FoldOutcome``); "" keeps
        :func:`server.cv.run_fold` (supervised rounds of the plan, whose node step is the
        paradigm's ``node`` hook).
    tasks : tuple of str
        Tasks it serves (empty: every task).
    check : callable, optional
        ``check(plan, options)`` raising :class:`ConfigError` for a plan it cannot run (a
        model or sample kind it does not serve), called when the run is configured.
    stage : bool
        A sub-run of another paradigm's workflow (its training rounds under that paradigm's
        node step): sent to the nodes in the plans of those sub-runs, but neither listed nor
        selectable with ``--paradigm``.
    """

    name: str
    summary: str
    options: tuple[ParadigmOption, ...] = ()
    workflow: str = ""
    node: str = ""
    cv: bool = True
    fold: str = ""
    tasks: tuple[str, ...] = ()
    check: Callable[[Any, Mapping[str, Any]], None] | None = field(default=None, compare=False)
    stage: bool = False

    def option(self, name: str) -> ParadigmOption:
        """The declared option ``name``; a :class:`ConfigError` listing the options otherwise."""
        for opt in self.options:
            if opt.name == name:
                return opt
        known = ", ".join(o.name for o in self.options) or "none"
        raise ConfigError(f"paradigm {self.name!r} has no option {name!r} (its options: {known})")

    def defaults(self) -> dict[str, Any]:
        """Every option at its default."""
        return {opt.name: opt.default for opt in self.options}


_REGISTRY: dict[str, Paradigm] = {}


def register_paradigm(paradigm: Paradigm) -> Paradigm:
    """Add ``paradigm`` to the registry (once per name) and return it."""
    if paradigm.name in _REGISTRY and _REGISTRY[paradigm.name] != paradigm:
        raise ValueError(f"paradigm {paradigm.name!r} is registered twice")
    for opt in paradigm.options:
        opt.convert(opt.default)  # a declaration whose default is invalid fails at import
    _REGISTRY[paradigm.name] = paradigm
    return paradigm


def list_paradigms(*, stages: bool = False) -> list[Paradigm]:
    """Every registered paradigm a user can choose (``stages``: the workflows' stages too), the
    default first, then by name."""
    return sorted((p for p in _REGISTRY.values() if stages or not p.stage),
                  key=lambda p: (p.name != DEFAULT_PARADIGM, p.name))


def get_paradigm(name: str) -> Paradigm:
    """The paradigm ``name``; a :class:`ConfigError` naming the registered ones otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(p.name for p in list_paradigms())
        raise ConfigError(f"unknown paradigm {name!r}; choose one of: {known}") from None


def parse_option_pairs(paradigm: Paradigm, pairs: Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` texts from the command line as checked, typed options (defaults filled)."""
    values = paradigm.defaults()
    seen: set[str] = set()
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--paradigm-option takes KEY=VALUE, got {pair!r}")
        if key in seen:
            raise ConfigError(f"--paradigm-option {key} is given twice")
        seen.add(key)
        values[key] = paradigm.option(key).convert(raw.strip())
    return values


def canonical_options(values: Mapping[str, Any]) -> str:
    """Options as the one JSON text the plan carries (sorted keys: equal options, equal text)."""
    if not values:
        return ""
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"))
    # no single quote, so that the text travels in Flower's --run-config as a TOML literal
    # string (cli.flower.toml_value); "\u0027" is the same JSON
    return text.replace("'", "\\u0027")


def read_options(paradigm: Paradigm, text: str) -> dict[str, Any]:
    """The plan's ``paradigm-options`` text as checked, typed options (defaults filled)."""
    values = paradigm.defaults()
    if not text:
        return values
    try:
        given = json.loads(text)
    except ValueError:
        raise ConfigError("paradigm-options must be a JSON object") from None
    if not isinstance(given, dict):
        raise ConfigError("paradigm-options must be a JSON object")
    for key, value in given.items():
        values[key] = paradigm.option(str(key)).convert(value)
    return values


def load_path(path: str) -> Callable[..., Any]:
    """The function a ``"module:function"`` path names (imported now)."""
    import importlib

    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
