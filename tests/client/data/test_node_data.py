"""load_node_data end to end on a small generated DICOM folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from client.data import NodeData, PatientRecordDataset, SplitArrays, load_node_data
from client.data.node_data import clear_cache
from client.data.splits import split_patients
from common.errors import DataError
from tests.client.dicom._factory import make_node_folder, write_image

PATIENTS = 12
IMAGES = 2


@pytest.fixture(autouse=True)
def _fresh_cache() -> Iterator[None]:
    clear_cache()
    yield
    clear_cache()


@pytest.fixture(scope="module")
def node_dir(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("node")
    labels = make_node_folder(root, patients=PATIENTS, images_per_patient=IMAGES, labelled=10)
    return root, labels


def _all_splits(data: NodeData) -> list[SplitArrays]:
    return [data.train, data.val, data.test]


def test_shapes_dtypes_and_counts(node_dir: tuple[Path, dict[str, int]]) -> None:
    # Prepare
    root, labels = node_dir
    # Execute
    data = load_node_data(root, image_size=16, seed=1)
    # Assert
    assert data.image_size == 16
    assert data.report.files_used == PATIENTS * IMAGES
    assert data.report.label_counts["unlabelled"] == 2 * IMAGES
    assert sum(len(s) for s in _all_splits(data)) == len(labels) * IMAGES
    assert sum(s.num_patients for s in _all_splits(data)) == len(labels)
    for split in _all_splits(data):
        assert split.images.dtype == torch.float32
        assert tuple(split.images.shape[1:]) == (1, 16, 16)
        assert split.labels.dtype == torch.int64 and split.patient_index.dtype == torch.int64
        if len(split):
            assert set(split.patient_index.tolist()) == set(range(split.num_patients))
    assert data.fingerprint == data.report.fingerprint and len(data.fingerprint) == 64


def test_labels_joined_per_patient(node_dir: tuple[Path, dict[str, int]]) -> None:
    # Prepare
    root, labels = node_dir
    expected = split_patients(labels, seed=1)
    # Execute
    data = load_node_data(root, image_size=16, seed=1)
    # Assert: patients are ordered by ID within a split, so labels line up
    for split, pids in zip(_all_splits(data), (expected.train, expected.val, expected.test)):
        assert split.num_patients == len(pids)
        for img_label, owner in zip(split.labels.tolist(), split.patient_index.tolist()):
            assert img_label == labels[pids[owner]]


def test_patient_record_dataset(node_dir: tuple[Path, dict[str, int]]) -> None:
    # Prepare
    data = load_node_data(node_dir[0], image_size=16, seed=1)
    dataset = PatientRecordDataset(data.train)
    torch.manual_seed(0)
    # Execute
    image, label = dataset[0]
    draws = {int(torch.nonzero((data.train.images == dataset[0][0]).all(dim=(1, 2, 3)))[0])
             for _ in range(30)}
    # Assert
    assert len(dataset) == data.train.num_patients
    assert tuple(image.shape) == (1, 16, 16)
    assert label.dtype == torch.int64
    owners = {int(data.train.patient_index[i]) for i in draws}
    assert owners == {0}
    assert len(draws) == IMAGES  # both images of patient 0 get drawn


def test_cache_hit_and_invalidation(tmp_path: Path) -> None:
    # Prepare
    make_node_folder(tmp_path, patients=6, images_per_patient=1)
    calls: list[int] = []
    first = load_node_data(tmp_path, image_size=8, progress=lambda d, t: calls.append(d))
    # Execute
    second = load_node_data(tmp_path, image_size=8, progress=lambda d, t: calls.append(d))
    write_image(tmp_path / "new" / "x.dcm")
    third = load_node_data(tmp_path, image_size=8)
    # Assert
    assert second is first
    assert calls == list(range(1, 7))
    assert third is not first
    assert third.report.files_used == 7


def test_no_labelled_image_is_data_error(tmp_path: Path) -> None:
    # Prepare
    make_node_folder(tmp_path, patients=3, images_per_patient=1, labelled=0)
    # Execute
    with pytest.raises(DataError) as info:
        load_node_data(tmp_path)
    # Assert
    assert info.value.safe_reason == "the node has no usable labelled image"


def test_empty_training_split_is_data_error(tmp_path: Path) -> None:
    # Prepare: a single patient; find a seed that puts them in test
    labels = make_node_folder(tmp_path, patients=1, images_per_patient=1)
    seed = next(s for s in range(1000) if split_patients(labels, seed=s).test)
    # Execute
    with pytest.raises(DataError) as info:
        load_node_data(tmp_path, seed=seed)
    # Assert
    assert "training split" in info.value.safe_reason
    assert str(tmp_path) not in info.value.safe_reason


def test_phi_files_excluded_when_required(tmp_path: Path) -> None:
    # Prepare
    make_node_folder(tmp_path, patients=4, images_per_patient=1)
    write_image(tmp_path / "phi.dcm", deidentified=False)
    # Execute
    strict = load_node_data(tmp_path, image_size=8)
    lax = load_node_data(tmp_path, image_size=8, require_deidentified=False)
    # Assert
    assert strict.report.skip_counts["phi"] == 1
    assert lax.report.files_used == strict.report.files_used + 1
