"""The node's split cache (client/data/cache.py): one read of the data folder, then the disk;
any change of a file or of the labels invalidates it; owner-only; corrupt entries rebuilt."""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from client.data.cache import LoadParams, SplitCache, cache_dir, clear_memo, dataset_key
from client.data.node_data import NodeData, clear_cache
from client.data.task_data import load_task_data

PARAMS = LoadParams(task="binary", num_classes=2, samples="image-2d", image_size=16,
                    require_deidentified=True)


@pytest.fixture(scope="module")
def site_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from client.dicom.synth import synthesize_federation

    root = tmp_path_factory.mktemp("cache-fed")
    synthesize_federation(root, n_sites=1, patients_per_site=24, images_per_patient=(1, 2),
                          image_size=16, seed=5)
    return root / "site-1"


@pytest.fixture()
def site(site_template: Path, tmp_path: Path) -> Path:
    """A private copy of the site (tests modify it), its mtimes kept."""
    import shutil

    return Path(shutil.copytree(site_template, tmp_path / "site"))


@pytest.fixture(autouse=True)
def _fresh_process() -> Iterator[None]:
    clear_memo()
    clear_cache()
    yield
    clear_memo()
    clear_cache()


class CountingLoader:
    """The node's loader, counting how often the data folder is really read."""

    def __init__(self, root: Path, params: LoadParams = PARAMS) -> None:
        self.root, self.params, self.calls = root, params, 0

    def __call__(self) -> NodeData:
        self.calls += 1
        p = self.params
        return load_task_data(self.root, task=p.task, num_classes=p.num_classes,
                              samples=p.samples, image_size=p.image_size,
                              require_deidentified=p.require_deidentified, seed=p.seed,
                              val_fraction=p.val_fraction, test_fraction=p.test_fraction)


def _new_process() -> None:
    """What a fresh ClientApp process starts with: no in-process cache at all."""
    clear_memo()
    clear_cache()


def _tree(root: Path) -> dict[str, tuple[int, int, str]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns,
                                             hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file()}


def _same(a: NodeData, b: NodeData) -> None:
    assert a.fingerprint == b.fingerprint and a.image_size == b.image_size
    assert a.report == b.report
    for name in ("train", "val", "test"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.num_patients == y.num_patients
        for field in ("images", "labels", "patient_index"):
            assert torch.equal(getattr(x, field), getattr(y, field)), (name, field)
            assert getattr(x, field).dtype == getattr(y, field).dtype


def test_second_load_in_a_new_process_reads_the_cache_not_the_folder(
        site: Path, tmp_path: Path) -> None:
    # Prepare
    cache = SplitCache(cache_dir(tmp_path / "ledger"))
    loader = CountingLoader(site)
    # Execute
    first = cache.load(site, PARAMS, loader)
    _new_process()
    second = cache.load(site, PARAMS, loader)
    # Assert
    assert loader.calls == 1
    _same(first, second)
    assert second is not first  # it came from the disk


def test_the_same_process_answers_from_memory(site: Path, tmp_path: Path) -> None:
    cache = SplitCache(cache_dir(tmp_path / "ledger"))
    loader = CountingLoader(site)
    first = cache.load(site, PARAMS, loader)
    assert cache.load(site, PARAMS, loader) is first and loader.calls == 1


def test_touching_a_file_invalidates_and_prunes_the_old_entry(site: Path, tmp_path: Path) -> None:
    folder = cache_dir(tmp_path / "ledger")
    cache = SplitCache(folder)
    loader = CountingLoader(site)
    cache.load(site, PARAMS, loader)
    before = sorted(folder.glob("*.npz"))
    some_file = next(p for p in sorted(site.rglob("*")) if p.is_file() and p.suffix != ".csv")
    st = some_file.stat()
    os.utime(some_file, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    _new_process()
    cache.load(site, PARAMS, loader)
    after = sorted(folder.glob("*.npz"))
    assert loader.calls == 2
    assert len(before) == len(after) == 1 and before != after  # the stale entry is gone


def test_a_new_file_invalidates(site: Path, tmp_path: Path) -> None:
    cache = SplitCache(cache_dir(tmp_path / "ledger"))
    loader = CountingLoader(site)
    cache.load(site, PARAMS, loader)
    (site / "notes.txt").write_text("not DICOM")
    _new_process()
    cache.load(site, PARAMS, loader)
    assert loader.calls == 2


def test_labels_edited_in_place_invalidate(site: Path, tmp_path: Path) -> None:
    cache = SplitCache(cache_dir(tmp_path / "ledger"))
    loader = CountingLoader(site)
    first = cache.load(site, PARAMS, loader)
    labels = site / "labels.csv"
    st = labels.stat()
    lines = labels.read_text().splitlines()
    header, rows = lines[0], lines[1:]
    flipped = [r[:-1] + ("1" if r.endswith("0") else "0") for r in rows]
    labels.write_text("\n".join([header, *flipped]) + "\n")
    os.utime(labels, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime; size unchanged
    assert labels.stat().st_size == st.st_size
    _new_process()
    second = cache.load(site, PARAMS, loader)
    assert loader.calls == 2
    assert not torch.equal(first.train.labels, second.train.labels)


def test_other_parameters_are_other_entries(site: Path, tmp_path: Path) -> None:
    folder = cache_dir(tmp_path / "ledger")
    cache = SplitCache(folder)
    bigger = LoadParams(**{**PARAMS.__dict__, "image_size": 24})
    cache.load(site, PARAMS, CountingLoader(site))
    cache.load(site, bigger, CountingLoader(site, bigger))
    assert len(list(folder.glob("*.npz"))) == 2  # both kept: neither is stale
    assert dataset_key(site, PARAMS) != dataset_key(site, bigger)


def test_owner_only_permissions_and_nothing_written_in_the_data_folder(
        site: Path, tmp_path: Path) -> None:
    before = _tree(site)
    site.chmod(0o555)  # a read-only data folder
    try:
        folder = cache_dir(tmp_path / "ledger")
        SplitCache(folder).load(site, PARAMS, CountingLoader(site))
    finally:
        site.chmod(0o755)
    assert _tree(site) == before
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = list(folder.iterdir())
    assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
    assert not any(p.name.startswith(".tmp-") for p in files)


def test_a_corrupt_entry_is_rebuilt_without_a_path_in_the_log(
        site: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = cache_dir(tmp_path / "ledger")
    cache = SplitCache(folder)
    loader = CountingLoader(site)
    first = cache.load(site, PARAMS, loader)
    entry = next(folder.glob("*.npz"))
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])  # truncated
    _new_process()
    with caplog.at_level(logging.WARNING):
        second = cache.load(site, PARAMS, loader)
    assert loader.calls == 2
    _same(first, second)
    assert "rebuilt" in caplog.text
    assert str(tmp_path) not in caplog.text and str(site) not in caplog.text
    _new_process()
    cache.load(site, PARAMS, loader)  # the rebuilt entry serves again
    assert loader.calls == 2


def test_an_entry_of_another_key_under_the_name_is_refused(site: Path, tmp_path: Path) -> None:
    folder = cache_dir(tmp_path / "ledger")
    cache = SplitCache(folder)
    loader = CountingLoader(site)
    cache.load(site, PARAMS, loader)
    entry = next(folder.glob("*.npz"))
    with np.load(entry, allow_pickle=False) as files:
        arrays = {name: files[name] for name in files.files}
    arrays["meta"] = np.frombuffer(b'{"key": {"format": 0}}', dtype=np.uint8)
    with entry.open("wb") as handle:
        np.savez(handle, **arrays)
    _new_process()
    cache.load(site, PARAMS, loader)
    assert loader.calls == 2


def test_an_unwritable_cache_folder_never_fails_the_load(site: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "ledger"
    blocker.write_text("a file where the ledger folder should be")
    loader = CountingLoader(site)
    data = SplitCache(cache_dir(blocker)).load(site, PARAMS, loader)
    assert loader.calls == 1 and data.train.num_patients > 0


def test_a_loader_error_propagates_and_stores_nothing(site: Path, tmp_path: Path) -> None:
    folder = cache_dir(tmp_path / "ledger")

    def failing() -> NodeData:
        raise RuntimeError("no usable image")

    with pytest.raises(RuntimeError):
        SplitCache(folder).load(site, PARAMS, failing)
    assert not folder.exists() or not list(folder.glob("*.npz"))


def test_the_file_signature_lists_what_the_scanner_reads(tmp_path: Path) -> None:
    """The files ``os.walk`` finds under the scanner's rules (hidden names skipped, links to
    files followed, links to folders and dangling links not), in order, with their sizes and
    times; ``iter_data_files`` yields the same files."""
    import os

    from client.dicom.scan import data_file_signature, iter_data_files

    root = tmp_path / "site"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.dcm").write_bytes(b"1")
    (root / "b" / "z.dcm").write_bytes(b"22")
    (root / "b" / "deep" / "c.dcm").write_bytes(b"333")
    (root / "b-file").write_bytes(b"4444")  # sorts between "b/..." entries by string
    (root / ".secret.dcm").write_bytes(b"x")
    (root / ".hidden" / "x.dcm").write_bytes(b"x")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "o.dcm").write_bytes(b"55555")
    os.symlink(outside / "o.dcm", root / "link.dcm")
    os.symlink(outside, root / "linked-folder")
    os.symlink(tmp_path / "missing.dcm", root / "dangling.dcm")
    walked = []  # os.walk, as the scanner used to: an independent reference
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(folder) / name
            if not name.startswith(".") and path.is_file():
                walked.append((path.relative_to(root).as_posix(), path))
    expected = [(rel, path.stat().st_size, path.stat().st_mtime_ns)
                for rel, path in sorted(walked)]
    assert data_file_signature(root) == expected
    assert [(rel, path) for path, rel in iter_data_files(root)] == [
        (rel, root / rel) for rel, _, _ in expected]
    assert [rel for rel, _, _ in expected] == ["a.dcm", "b-file", "b/deep/c.dcm", "b/z.dcm",
                                               "link.dcm"]
