"""Packing an ArrayRecord into one flat array per dtype: a bit-exact, order-preserving round
trip (common/packing.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.packing import (
    BUFFER_PREFIX,
    LAYOUT_KEY,
    TRANSPORT_KEY,
    PackingError,
    is_marked,
    is_packed,
    pack_content,
    pack_record,
    unpack_content,
    unpack_record,
)


def _mixed() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "conv.weight": rng.standard_normal((4, 1, 3, 3)).astype(np.float32),
        "ring": rng.integers(0, 2**64 - 1, size=11, dtype=np.uint64, endpoint=True),
        "counts": np.array([-(2**63), -1, 0, 2**63 - 1], dtype=np.int64),
        "empty": np.zeros((0,), dtype=np.float32),
        "empty-2d": np.zeros((3, 0), dtype=np.int64),
        "scalar": np.array(5, dtype=np.int64),  # 0-d, like num_batches_tracked
        "mask": np.array([[True, False], [False, True]]),
        "double": np.array([np.pi, -0.0, np.inf, -np.inf, 1e-308], dtype=np.float64),
        "nan": np.array([np.nan, 1.0], dtype=np.float32),
        "fortran": np.asfortranarray(rng.standard_normal((3, 5)).astype(np.float32)),
        "bias": rng.standard_normal(4).astype(np.float32),
    }


def _assert_same(original: ArrayRecord, restored: ArrayRecord) -> None:
    assert list(restored.keys()) == list(original.keys())  # order preserved
    for name, arr in original.items():
        a, b = arr.numpy(), restored[name].numpy()
        assert restored[name].dtype == arr.dtype, name
        assert tuple(restored[name].shape) == tuple(arr.shape), name
        assert b.dtype == a.dtype and b.shape == a.shape, name
        # bit-exact: compare the C-ordered bytes (NaN payloads and -0.0 included)
        assert np.ascontiguousarray(b).tobytes() == np.ascontiguousarray(a).tobytes(), name


def test_round_trip_is_bit_exact_for_every_dtype_and_keeps_order() -> None:
    # Prepare
    record = ArrayRecord({name: Array(value) for name, value in _mixed().items()})
    # Execute
    packed = pack_record(record)
    restored = unpack_record(packed)
    # Assert
    assert is_packed(packed) and not is_packed(record)
    _assert_same(record, restored)


def test_one_flat_buffer_per_dtype() -> None:
    record = ArrayRecord({name: Array(value) for name, value in _mixed().items()})
    packed = pack_record(record)
    buffers = [key for key in packed.keys() if key != LAYOUT_KEY]
    dtypes = {np.dtype(v.dtype).str for v in _mixed().values()}
    assert len(buffers) == len(dtypes)
    assert all(key.startswith(BUFFER_PREFIX) for key in buffers)
    assert all(len(packed[key].shape) == 1 for key in buffers)
    float32 = sum(v.size for v in _mixed().values() if v.dtype == np.float32)
    sizes = sorted(packed[key].shape[0] for key in buffers)
    assert float32 in sizes


def test_torch_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.GroupNorm(2, 4),
                                torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))
    state = model.state_dict()
    state["steps"] = torch.tensor(3, dtype=torch.int64)
    record = ArrayRecord(state)
    restored = unpack_record(pack_record(record)).to_torch_state_dict()
    assert list(restored) == list(state)
    for name, tensor in state.items():
        assert torch.equal(restored[name], tensor), name
        assert restored[name].dtype == tensor.dtype


def test_many_tensors_in_order() -> None:
    arrays = [np.full((i % 5, 2), i, dtype=np.float32) for i in range(700)]
    record = ArrayRecord(arrays)
    packed = pack_record(record)
    assert len(packed) == 2  # the layout and one float32 buffer
    _assert_same(record, unpack_record(packed))


@pytest.mark.parametrize("record", [
    ArrayRecord(),
    ArrayRecord({"only": Array(np.arange(3, dtype=np.int64))}),
])
def test_small_records_travel_as_they_are(record: ArrayRecord) -> None:
    assert pack_record(record) is record
    assert unpack_record(record) is record


def test_non_numpy_arrays_are_left_alone() -> None:
    record = ArrayRecord({
        "a": Array(np.ones(2, np.float32)),
        "b": Array(dtype="float32", shape=(2,), stype="custom", data=b"12345678"),
    })
    assert pack_record(record) is record


def test_packing_twice_is_packing_once() -> None:
    record = ArrayRecord({name: Array(value) for name, value in _mixed().items()})
    packed = pack_record(record)
    assert pack_record(packed) is packed


def test_content_keeps_other_records_and_the_marker_is_removed() -> None:
    arrays = ArrayRecord({name: Array(value) for name, value in _mixed().items()})
    config = ConfigRecord({"server-round": 2})
    metrics = MetricRecord({"num-examples": 10})
    content = RecordDict({"arrays": arrays, "config": config, "metrics": metrics})
    packed = pack_content(content, mark=True)
    assert is_marked(packed) and not is_marked(content)
    assert is_packed(packed["arrays"])  # type: ignore[arg-type]
    assert packed["config"] is config and packed["metrics"] is metrics
    assert list(content.keys()) == ["arrays", "config", "metrics"]  # input untouched
    assert content["arrays"] is arrays
    restored = unpack_content(packed)
    assert TRANSPORT_KEY not in restored
    assert list(restored.keys()) == ["arrays", "config", "metrics"]
    _assert_same(arrays, restored["arrays"])  # type: ignore[arg-type]


def test_unpacking_content_that_is_not_packed_changes_nothing() -> None:
    arrays = ArrayRecord({name: Array(value) for name, value in _mixed().items()})
    content = RecordDict({"arrays": arrays, "config": ConfigRecord({"x": 1})})
    restored = unpack_content(content)
    assert restored["arrays"] is arrays and restored["config"] is content["config"]


def _layout_record(layout: object, buffer: np.ndarray) -> ArrayRecord:
    raw = np.frombuffer(json.dumps(layout).encode(), dtype=np.uint8)
    return ArrayRecord({LAYOUT_KEY: Array(raw), f"{BUFFER_PREFIX}0": Array(buffer)})


@pytest.mark.parametrize("record", [
    _layout_record({"version": 99, "buffers": ["<f4"], "tensors": []}, np.ones(2, np.float32)),
    _layout_record({"version": 1, "buffers": ["<f8"], "tensors": [["a", 0, 0, [2]]]},
                   np.ones(2, np.float32)),  # buffer dtype differs from its layout
    _layout_record({"version": 1, "buffers": ["<f4"], "tensors": [["a", 0, 1, [2]]]},
                   np.ones(2, np.float32)),  # tensor runs past the buffer
    _layout_record({"version": 1, "buffers": ["<f4", "<i8"], "tensors": []},
                   np.ones(2, np.float32)),  # a buffer is missing
    _layout_record({"version": 1}, np.ones(2, np.float32)),
    ArrayRecord({LAYOUT_KEY: Array(np.frombuffer(b"\xff\xfe", np.uint8)),
                 "x": Array(np.ones(1))}),
])
def test_malformed_packed_records_are_refused(record: ArrayRecord) -> None:
    with pytest.raises(PackingError):
        unpack_record(record)
