"""A node's datasets: labels, patient-level splits, MONAI transforms, MedMNIST loader.

The public names are imported lazily (PEP 562) so that header-only tools such as
``vesalius node check`` (which use :mod:`client.data.labels` through
:func:`client.dicom.scan_data_dir`) do not pay for importing torch and MONAI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.data.node_data import NodeData, PatientRecordDataset, SplitArrays, load_node_data

__all__ = ["NodeData", "PatientRecordDataset", "SplitArrays", "load_node_data"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("client.data.node_data"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
