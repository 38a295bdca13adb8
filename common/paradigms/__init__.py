"""Learning paradigms (``--paradigm``): one module per paradigm, each registering itself.

See :mod:`common.paradigms.registry` for the contract. Importing this package imports every
module in it, so that every paradigm is registered.
"""

from __future__ import annotations

import importlib
import pkgutil

from common.paradigms.registry import (
    DEFAULT_PARADIGM,
    Paradigm,
    ParadigmOption,
    canonical_options,
    get_paradigm,
    list_paradigms,
    load_path,
    parse_option_pairs,
    read_options,
    register_paradigm,
)

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

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "registry":
        importlib.import_module(f"{__name__}.{_info.name}")
