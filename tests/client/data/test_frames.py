"""Colour and multi-frame DICOM files train through the node's loaders (client.data.frames)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import client.data.node_data as node_data
from client.data.frames import LUMA_WEIGHTS, frame_order, image_frames, luma, volume_frames
from client.data.node_data import clear_cache, load_node_data
from client.data.task_data import load_task_data
from client.data.transforms import image_transform
from client.dicom.pixels import read_pixels
from client.dicom.synth import synthesize_site
from client.dicom.synth_profiles import default_profiles
from tests.client.dicom._factory import make_dataset, write_dataset, write_labels
from tests.client.dicom.test_color import _color_dataset, _rgb_to_ybr_full

SIZE = 8  # rows = columns = image side: the resize is then the identity


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


def _rgb(seed: int, frames: int = 1) -> npt.NDArray[np.uint8]:
    shape = (frames, SIZE, SIZE, 3) if frames > 1 else (SIZE, SIZE, 3)
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def _palette_dataset(indices: npt.NDArray[np.uint8]) -> tuple[Dataset, npt.NDArray[np.float64]]:
    """8-bit PALETTE COLOR with 16-bit LUTs; returns the dataset and the mapped RGB."""
    red = np.arange(256, dtype=np.uint16) * 256
    green = (255 - np.arange(256, dtype=np.uint16)) * 256
    blue = np.full(256, 1000, dtype=np.uint16)
    ds = make_dataset(pixels=np.zeros(indices.shape, dtype=np.uint16))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    del ds.RescaleSlope, ds.RescaleIntercept
    for colour, table in (("Red", red), ("Green", green), ("Blue", blue)):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", table.astype("<u2").tobytes())
    ds.PixelData = indices.tobytes()
    rgb = np.stack([red[indices], green[indices], blue[indices]], axis=-1).astype(np.float64)
    return ds, rgb


def _greyscale_multiframe(values: list[int], **kwargs: object) -> Dataset:
    frames = np.stack([np.full((SIZE, SIZE), v, dtype=np.uint16) for v in values])
    frames[:, 0, 0] += 1  # not constant: the robust scaling keeps the level
    ds = make_dataset(pixels=frames[0], **kwargs)  # type: ignore[arg-type]
    ds.NumberOfFrames = len(values)
    ds.PixelData = frames.astype("<u2").tobytes()
    return ds


def _formula(rgb: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """0.299 R + 0.587 G + 0.114 B, written out here."""
    return (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)


def _place(ds: Dataset, root: Path, pid: str) -> tuple[str, str, object]:
    ds.PatientID = ds.PatientName = pid
    write_dataset(ds, root / pid / "img.dcm")
    return pid, str(ds.StudyInstanceUID), 1 if pid.endswith(("1", "3", "5")) else 0


@pytest.fixture()
def colour_node(tmp_path: Path) -> tuple[Path, dict[str, npt.NDArray[np.float32]]]:
    """Six patients, one file each: RGB, YBR_FULL, palette, 3-frame RGB, 4-frame grey, grey.

    Returns the folder and, per patient, the expected greyscale frames (formula applied).
    """
    root = tmp_path / "node"
    rgb0, rgb3 = _rgb(0), _rgb(3, frames=3)
    ybr_source = _rgb(1).astype(np.float64)
    ybr = _color_dataset(_rgb_to_ybr_full(ybr_source), "YBR_FULL")
    indices = np.arange(SIZE * SIZE, dtype=np.uint8).reshape(SIZE, SIZE)
    palette, palette_rgb = _palette_dataset(indices)
    datasets = {
        "P0": (_color_dataset(rgb0, "RGB"), _formula(rgb0.astype(np.float64))[None]),
        "P1": (ybr, _formula(ybr_source)[None]),  # within YCbCr rounding
        "P2": (palette, _formula(palette_rgb)[None]),
        "P3": (_color_dataset(rgb3, "RGB", frames=3), _formula(rgb3.astype(np.float64))),
    }
    grey_mf = _greyscale_multiframe([100, 200, 300, 400])
    grey = make_dataset(pixels=np.arange(SIZE * SIZE, dtype=np.uint16).reshape(SIZE, SIZE))
    expected = {pid: frames for pid, (_, frames) in datasets.items()}
    expected["P4"] = _stored_frames(grey_mf)
    expected["P5"] = np.arange(SIZE * SIZE, dtype=np.float32).reshape(1, SIZE, SIZE)
    rows = [_place(ds, root, pid) for pid, (ds, _) in datasets.items()]
    rows += [_place(grey_mf, root, "P4"), _place(grey, root, "P5")]
    write_labels(root, rows)
    return root, expected


def _stored_frames(ds: Dataset) -> npt.NDArray[np.float32]:
    """The stored values of a native 16-bit multi-frame dataset (slope 1, intercept 0)."""
    stored = np.frombuffer(ds.PixelData, dtype="<u2").reshape(int(ds.NumberOfFrames), SIZE, SIZE)
    return stored.astype(np.float32)


def _transformed(frames: npt.NDArray[np.float32]) -> torch.Tensor:
    transform = image_transform(SIZE)
    return torch.stack([torch.as_tensor(transform(f), dtype=torch.float32) for f in frames])


def test_luma_uses_the_bt601_weights() -> None:
    # Prepare
    rgb = np.array([[[255.0, 0.0, 0.0], [0.0, 255.0, 0.0], [0.0, 0.0, 255.0], [10, 20, 30]]])
    # Execute
    y = luma(rgb)
    # Assert
    assert LUMA_WEIGHTS == (0.299, 0.587, 0.114)
    np.testing.assert_allclose(y[0], [76.245, 149.685, 29.07, 18.15], rtol=1e-6)
    assert y.dtype == np.float32


def test_image_frames_per_photometric_model(
    colour_node: tuple[Path, dict[str, npt.NDArray[np.float32]]],
) -> None:
    # Prepare
    root, expected = colour_node
    # Execute
    found = {pid: np.stack(image_frames(root / pid / "img.dcm")) for pid in expected}
    # Assert: one 2-D float32 image per frame; luma by the formula (YBR within rounding)
    for pid, frames in expected.items():
        assert found[pid].dtype == np.float32 and found[pid].shape == frames.shape, pid
        tolerance = 3.0 if pid == "P1" else 1e-3
        assert np.abs(found[pid] - frames).max() <= tolerance, pid
    np.testing.assert_array_equal(image_frames(root / "P5" / "img.dcm")[0],
                                  read_pixels(root / "P5" / "img.dcm"))


@pytest.mark.parametrize("task", ["binary", "multiclass"])
def test_task_data_trains_on_every_frame_of_colour_files(
    colour_node: tuple[Path, dict[str, npt.NDArray[np.float32]]], task: str,
) -> None:
    # Prepare
    root, expected = colour_node
    # Execute
    data = load_task_data(root, task=task, num_classes=2, image_size=SIZE,
                          val_fraction=0.0, test_fraction=0.0)
    # Assert: every file usable; one image per frame; patients in Patient ID order
    assert data.report.files_used == 6
    train = data.train
    assert train.num_patients == 6 and len(train) == sum(f.shape[0] for f in expected.values())
    owners = [i for i, pid in enumerate(sorted(expected)) for _ in range(expected[pid].shape[0])]
    assert train.patient_index.tolist() == owners
    assert train.labels.tolist()[:2] == [0, 1]  # P0 (one image), then P1's label
    start = 0
    for pid in sorted(expected):
        count = expected[pid].shape[0]
        got, want = train.images[start:start + count], _transformed(expected[pid])
        start += count
        if pid == "P1":  # YBR_FULL: luma of the decoded RGB, within YCbCr rounding
            want = _transformed(np.stack(image_frames(root / pid / "img.dcm")))
        assert got.shape == (count, 1, SIZE, SIZE), pid
        # one pixel checked against the formula after the same resize and scaling
        assert float(got[0, 0, 3, 5]) == pytest.approx(float(want[0, 0, 3, 5]), abs=1e-5), pid
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_node_data_and_task_data_agree_and_other_tasks_read_frames(
    colour_node: tuple[Path, dict[str, npt.NDArray[np.float32]]],
) -> None:
    # Prepare
    root, expected = colour_node
    # Execute: binary through load_node_data, reconstruction through task_data's own 2-D path
    binary = load_node_data(root, image_size=SIZE, val_fraction=0.0, test_fraction=0.0)
    recon = load_task_data(root, task="reconstruction", image_size=SIZE,
                           val_fraction=0.0, test_fraction=0.0)
    # Assert
    assert len(binary.train) == len(recon.train) == sum(f.shape[0] for f in expected.values())
    assert torch.equal(binary.train.images, recon.train.images)


def _positions(ds: Dataset, z: list[float]) -> None:
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    items = []
    for value in z:
        position = Dataset()
        position.ImagePositionPatient = [0.0, 0.0, value]
        item = Dataset()
        item.PlanePositionSequence = Sequence([position])
        items.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(items)


def test_frame_order_sorts_by_per_frame_position_and_otherwise_keeps_stored_order() -> None:
    # Prepare
    ds = _greyscale_multiframe([1, 2, 3])
    # Execute / Assert
    assert frame_order(ds, 3) is None
    _positions(ds, [5.0, -1.0, 2.0])
    assert frame_order(ds, 3) == [1, 2, 0]
    assert frame_order(ds, 4) is None


@pytest.mark.parametrize("positioned", [True, False])
def test_multi_frame_file_is_one_volume(tmp_path: Path, positioned: bool) -> None:
    # Prepare: two patients, one 8-frame file each, stored from top (bright) to bottom
    root = tmp_path / "node"
    rows = []
    for pid in ("P0", "P1"):
        ds = _greyscale_multiframe([800, 700, 600, 500, 400, 300, 200, 100])
        if positioned:
            _positions(ds, [7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
        rows.append(_place(ds, root, pid))
    write_labels(root, rows)
    # Execute
    data = load_task_data(root, task="binary", samples="volume-3d", image_size=SIZE,
                          val_fraction=0.0, test_fraction=0.0)
    stack = volume_frames(root / "P0" / "img.dcm")
    # Assert: one [1, S, S, S] sample per study; slices sorted by position when given
    assert tuple(data.train.images.shape) == (2, 1, SIZE, SIZE, SIZE)
    assert data.train.num_patients == 2
    levels = data.train.images[0, 0].mean(dim=(1, 2))
    steps = levels[1:] - levels[:-1]
    assert bool((steps > 0).all()) if positioned else bool((steps < 0).all())
    assert stack.shape == (8, SIZE, SIZE)
    assert float(stack[0, 1, 1]) == (100.0 if positioned else 800.0)


def test_greyscale_demo_folder_gives_the_tensors_read_pixels_gave(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Prepare: a small synthetic demo hospital per profile (MONOCHROME1/2, slopes, sizes)
    sites = []
    for index, profile in enumerate(default_profiles(3)):
        site = tmp_path / f"site-{index + 1}"
        synthesize_site(site, profile, site_index=index, patients=8, image_size=32, seed=3)
        sites.append(site)
    # Execute: today's loader, then the earlier one (one read_pixels image per file)
    now = [load_node_data(site, image_size=16) for site in sites]
    clear_cache()
    monkeypatch.setattr(node_data, "image_frames", lambda path: [read_pixels(path)])
    before = [load_node_data(site, image_size=16) for site in sites]
    # Assert: bit-identical images, labels and owners in every split
    for a, b in zip(now, before):
        assert a.fingerprint == b.fingerprint
        for name in ("train", "val", "test"):
            x, y = getattr(a, name), getattr(b, name)
            assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
            assert torch.equal(x.patient_index, y.patient_index)
    for site in sites:
        for path in sorted(site.rglob("*.dcm")):
            frames = image_frames(path)
            assert len(frames) == 1 and np.array_equal(frames[0], read_pixels(path))
            assert frames[0].dtype == np.float32


@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
def test_single_frame_greyscale_is_read_pixels_bit_for_bit(
    tmp_path: Path, photometric: str,
) -> None:
    # Prepare: a rescaled CT-like image
    pixels = np.random.default_rng(7).integers(0, 4000, size=(SIZE, SIZE), dtype=np.uint16)
    ds = make_dataset(pixels=pixels, slope=0.5, intercept=-1024.0)
    ds.PhotometricInterpretation = photometric
    path = write_dataset(ds, tmp_path / "ct.dcm")
    # Execute
    frames = image_frames(path)
    # Assert
    assert len(frames) == 1 and frames[0].tobytes() == read_pixels(path).tobytes()
