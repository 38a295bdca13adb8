"""Models as one flat array per dtype: the wire layout of :mod:`server.transport` and
:mod:`client.transport`.

Flower 1.42 serialises every :class:`flwr.app.Array` of an :class:`flwr.app.ArrayRecord` as
its own object (``np.save`` bytes cut into chunks), and in deployment every object travels
as separate HTTP requests per hop, so the time of a round grows with the number of tensors
(a 727-tensor DenseNet121 took ~135 s per round on loopback, ~20 s packed; see
``docs/PLATFORM.md``). :func:`pack_record` turns a record of many tensors into a record of
one flat array per dtype plus a layout array; :func:`unpack_record` restores the original
record: same names in the same order, same dtypes and shapes, every byte equal (integer
buffers such as secure-aggregation ring elements stay exact).

Layout of a packed record (all keys in this module, see :data:`LAYOUT_KEY`)::

    vesalius.packed.layout   uint8 [L]   UTF-8 JSON {"version": 1,
                                          "buffers": [dtype.str, ...],
                                          "tensors": [[name, buffer, offset, shape], ...]}
    vesalius.packed.0        <dtype 0> [N0]   every tensor of that dtype, raveled (C order)
    vesalius.packed.1        ...

A record whose arrays are not all NumPy-serialised (``stype``) is left as it is.
:func:`pack_content` / :func:`unpack_content` apply this to every ArrayRecord of a
:class:`flwr.app.RecordDict` and leave its other records untouched.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from io import BytesIO
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from numpy.lib import format as npf
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common.constant import SType

__all__ = [
    "BUFFER_PREFIX",
    "ENV_TRANSPORT",
    "LAYOUT_KEY",
    "LAYOUT_VERSION",
    "MIN_ARRAYS",
    "TRANSPORT_KEY",
    "PackingError",
    "is_marked",
    "is_packed",
    "pack_content",
    "transport_enabled",
    "pack_record",
    "unpack_content",
    "unpack_record",
]

#: Key of the layout array in a packed record.
LAYOUT_KEY: Final = "vesalius.packed.layout"
#: Prefix of the flat buffers of a packed record (followed by the buffer's index).
BUFFER_PREFIX: Final = "vesalius.packed."
#: Version of the layout; a record of another version is refused, never guessed at.
LAYOUT_VERSION: Final = 1
#: Records with fewer arrays travel unpacked (nothing to gain).
MIN_ARRAYS: Final = 2
#: ConfigRecord the coordinator adds to a message whose replies it can unpack; the node's
#: mod removes it before any handler sees the message.
TRANSPORT_KEY: Final = "vesalius.transport"
_PACKED_FLAG: Final = "packed"
#: Environment variable of the coordinator's and the nodes' processes: ``stock`` switches
#: packing (and the coordinator's adaptive polling) off, for comparisons with Flower's own.
ENV_TRANSPORT: Final = "VESALIUS_TRANSPORT"


def transport_enabled() -> bool:
    """False when :data:`ENV_TRANSPORT` is ``stock`` (any case), else True."""
    return os.environ.get(ENV_TRANSPORT, "").strip().lower() != "stock"


class PackingError(ValueError):
    """A record claims the packed layout but does not hold it (malformed or other version)."""


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` is in the packed layout (it holds :data:`LAYOUT_KEY`)."""
    return LAYOUT_KEY in record


_MAGIC: Final = b"\x93NUMPY"


def _numpy(array: Array) -> npt.NDArray[Any]:
    """The values of ``array`` as a read-only view of its ``np.save`` bytes when they are
    C-ordered (the usual case: no copy, no header parsing beyond its length), else
    :meth:`flwr.app.Array.numpy`."""
    data = array.data
    if data[:6] == _MAGIC and len(data) >= 10:
        major = data[6]
        size_bytes = 2 if major == 1 else 4
        start = 8 + size_bytes
        header_len = int.from_bytes(data[8:start], "little")
        end = start + header_len
        header = data[start:end]
        if b"'fortran_order': False" in header and major in (1, 2, 3):
            dtype = np.dtype(array.dtype)
            if not dtype.hasobject:
                return np.frombuffer(data, dtype=dtype, offset=end).reshape(array.shape)
    return array.numpy()


def _npy_header(dtype: np.dtype[Any], shape: tuple[int, ...]) -> bytes:
    header = BytesIO()
    npf.write_array_header_1_0(header, {"descr": npf.dtype_to_descr(dtype),
                                        "fortran_order": False, "shape": shape})
    return header.getvalue()


def _array(values: npt.NDArray[Any], dtype_name: str, header: bytes) -> Array:
    """An :class:`flwr.app.Array` of the C-ordered ``values``, as ``Array(values)`` would make
    it (``np.save`` version 1.0 bytes, ``header`` from :func:`_npy_header`) but without a
    round through ``np.save``."""
    return Array(dtype=dtype_name, shape=values.shape, stype=SType.NUMPY,
                 data=header + values.tobytes())


def pack_record(record: ArrayRecord, *, min_arrays: int = MIN_ARRAYS) -> ArrayRecord:
    """``record`` as one flat array per dtype plus a layout (see the module docstring).

    Parameters
    ----------
    record : ArrayRecord
        Any record. It is not modified.
    min_arrays : int, keyword-only
        Records with fewer arrays are returned as they are.

    Returns
    -------
    ArrayRecord
        The packed record; ``record`` itself when it is already packed, has fewer than
        ``min_arrays`` arrays or holds an array that is not NumPy-serialised.
    """
    if len(record) < min_arrays or is_packed(record):
        return record
    if any(arr.stype != SType.NUMPY for arr in record.values()):
        return record
    groups: dict[str, list[npt.NDArray[Any]]] = {}
    sizes: dict[str, int] = {}
    tensors: list[list[Any]] = []
    buffers: list[str] = []
    for name, arr in record.items():
        values = _numpy(arr)
        code = values.dtype.str
        if values.dtype.hasobject:  # never the case for np.save(allow_pickle=False) data
            return record
        if code not in groups:
            groups[code] = []
            sizes[code] = 0
            buffers.append(code)
        tensors.append([name, buffers.index(code), sizes[code], list(values.shape)])
        groups[code].append(values.reshape(-1))
        sizes[code] += int(values.size)
    layout = {"version": LAYOUT_VERSION, "buffers": buffers, "tensors": tensors}
    packed: dict[str, Array] = {
        LAYOUT_KEY: Array(np.frombuffer(json.dumps(layout).encode("utf-8"), dtype=np.uint8))
    }
    for index, code in enumerate(buffers):
        parts = groups[code]
        flat = np.concatenate(parts) if len(parts) > 1 else np.ascontiguousarray(parts[0])
        packed[f"{BUFFER_PREFIX}{index}"] = Array(flat)
    return ArrayRecord(packed)


def _layout(record: ArrayRecord) -> Mapping[str, Any]:
    try:
        raw = _numpy(record[LAYOUT_KEY])
        layout = json.loads(raw.astype(np.uint8, copy=False).tobytes().decode("utf-8"))
    except (ValueError, TypeError, UnicodeDecodeError) as exc:
        raise PackingError(f"unreadable packed layout ({type(exc).__name__})") from None
    if not isinstance(layout, dict) or layout.get("version") != LAYOUT_VERSION:
        raise PackingError("packed layout of an unknown version")
    return layout


def unpack_record(record: ArrayRecord) -> ArrayRecord:
    """The original record of a packed one (a record not packed is returned as it is).

    Raises
    ------
    PackingError
        The layout is unreadable, of another version, or does not match the buffers.
    """
    if not is_packed(record):
        return record
    layout = _layout(record)
    try:
        flats = []
        for index, code in enumerate(layout["buffers"]):
            flat = _numpy(record[f"{BUFFER_PREFIX}{index}"])
            if flat.dtype.str != code or flat.ndim != 1:
                raise PackingError("packed buffer does not match its layout")
            flats.append(flat)
        names = [str(flat.dtype) for flat in flats]
        headers: dict[tuple[int, tuple[int, ...]], bytes] = {}
        out = ArrayRecord()  # filled in place: ArrayRecord(dict) would copy every Array
        for name, buffer, offset, shape in layout["tensors"]:
            index, dims = int(buffer), tuple(int(n) for n in shape)
            flat = flats[index]
            count = int(np.prod(dims, dtype=np.int64))
            if offset < 0 or offset + count > flat.size:
                raise PackingError("packed tensor lies outside its buffer")
            header = headers.get((index, dims))
            if header is None:
                header = headers[(index, dims)] = _npy_header(flat.dtype, dims)
            out[str(name)] = _array(flat[offset:offset + count].reshape(dims), names[index],
                                    header)
    except PackingError:
        raise
    except (KeyError, ValueError, TypeError, IndexError) as exc:
        raise PackingError(f"malformed packed record ({type(exc).__name__})") from None
    return out


def pack_content(content: RecordDict, *, mark: bool = False,
                 min_arrays: int = MIN_ARRAYS) -> RecordDict:
    """A new RecordDict with every ArrayRecord of ``content`` packed (other records shared).

    ``content`` is not modified. With ``mark`` the :data:`TRANSPORT_KEY` ConfigRecord is
    added: it tells the node that the sender unpacks packed replies.
    """
    out = RecordDict()
    for key, record in content.items():
        out[key] = (pack_record(record, min_arrays=min_arrays)
                    if isinstance(record, ArrayRecord) else record)
    if mark:
        out[TRANSPORT_KEY] = ConfigRecord({_PACKED_FLAG: True})
    return out


def is_marked(content: RecordDict) -> bool:
    """Whether ``content`` carries the :data:`TRANSPORT_KEY` marker of :func:`pack_content`."""
    record = content.get(TRANSPORT_KEY)
    return isinstance(record, ConfigRecord) and bool(record.get(_PACKED_FLAG, False))


def unpack_content(content: RecordDict) -> RecordDict:
    """A new RecordDict with every packed ArrayRecord unpacked and the marker removed.

    Records that are not packed are shared with ``content``, which is not modified.

    Raises
    ------
    PackingError
        A record claims the packed layout but does not hold it.
    """
    out = RecordDict()
    for key, record in content.items():
        if key == TRANSPORT_KEY:
            continue
        out[key] = unpack_record(record) if isinstance(record, ArrayRecord) else record
    return out
