"""The node's preprocessed splits on its own disk, so a new process does not read the data
folder again.

Flower starts a fresh ClientApp process for every message, and scanning, decoding and
resampling a hospital's DICOM folder costs far more than a round of training a small model.
:class:`SplitCache` keeps what :func:`client.data.task_data.load_task_data` returns (the
:class:`~client.data.node_data.NodeData`: the scan report, the dataset fingerprint and the
images, targets and patient indices of every split) in one ``.npz`` file per dataset and
set of load parameters:

* **where**: ``<ledger folder>/split-cache/`` (:func:`cache_dir`), the node's own state
  folder (``$VESALIUS_HOME/ledger`` by default): never in the data folder, which may be
  read-only and is never written. The folder is ``0700``, every file ``0600``: the arrays
  are the hospital's images and the report names its files, so they stay on the node.
* **key**: :func:`dataset_key`, a SHA-256 of every file's relative path, size and
  modification time (ns) under the data folder, the SHA-256 of ``labels.csv``'s content,
  the load parameters (task, number of classes, sample kind, image size, whether identified
  files are refused, split seed and fractions) and the loader's version (:data:`LOADER_VERSION`
  and a hash of the loader's source code). Changing, adding, removing or touching any file,
  or editing the labels, gives a new key; a new Vesalius version that changes the loaders
  does too.
* **writes** are atomic (a temporary file in the same folder, then ``os.replace``); a new
  entry for a data folder and parameters removes that folder's older entries with the same
  parameters (stale ones: their files changed).
* **reads** never trust the file blindly: ``np.load(allow_pickle=False)``, the stored key must
  equal the expected one, every array's dtype and shape is checked. An unreadable, corrupt
  or mismatched entry is logged (without any path), removed and rebuilt; a cache folder that
  cannot be written is skipped. The node never fails because of its cache.

An in-process memo (a few entries) answers repeated loads in one long-lived process without
touching the disk; the fingerprint is still recomputed (a ``stat`` of every file) each time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import torch

from client.data.labels import LABELS_FILENAME
from client.data.node_data import NodeData, SplitArrays
from client.dicom.reasons import SkipCode, SkippedFile
from client.dicom.report import IngestionReport
from client.dicom.scan import data_file_signature

__all__ = ["CACHE_DIRNAME", "LOADER_VERSION", "LoadParams", "SplitCache", "cache_dir",
           "dataset_key"]

log = logging.getLogger(__name__)

#: Bump when what the loaders produce changes in a way their source hash would not show.
LOADER_VERSION: Final = 1
#: Folder of the cache inside the node's ledger folder.
CACHE_DIRNAME: Final = "split-cache"
#: Format of the cache files (a reader refuses any other).
FORMAT: Final = 1
_SPLITS: Final = ("train", "val", "test")
_MEMO_SIZE: Final = 4
#: Loader packages whose source enters the key (a code change invalidates the cache).
_LOADER_PACKAGES: Final = ("client.data", "client.dicom")


@dataclass(frozen=True)
class LoadParams:
    """The arguments of :func:`client.data.task_data.load_task_data` that shape its result."""

    task: str
    num_classes: int
    samples: str
    image_size: int
    require_deidentified: bool
    seed: int = 0
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def kwargs(self) -> dict[str, Any]:
        """These parameters as keyword arguments of ``load_task_data``."""
        return asdict(self)


def cache_dir(ledger_dir: Path) -> Path:
    """The cache folder of a node whose ledger lives in ``ledger_dir``."""
    return ledger_dir / CACHE_DIRNAME


@lru_cache(maxsize=1)
def _loader_source_hash() -> str:
    """SHA-256 over the source files of the loader packages (computed once per process)."""
    import importlib

    digest = hashlib.sha256()
    for name in _LOADER_PACKAGES:
        package = importlib.import_module(name)
        for folder in getattr(package, "__path__", []):
            for path in sorted(Path(folder).glob("*.py")):
                digest.update(path.name.encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def dataset_key(data_dir: Path, params: LoadParams) -> dict[str, Any]:
    """What identifies one cached load: the folder's file signature, the labels' content
    hash, the load parameters and the loader version (see the module docstring).

    Raises
    ------
    OSError
        A file vanished or cannot be read while the folder is being fingerprinted.
    """
    files = hashlib.sha256()
    count = 0
    for rel, size, mtime_ns in data_file_signature(data_dir):
        files.update(f"{rel}\0{size}\0{mtime_ns}\n".encode())
        count += 1
    labels = data_dir / LABELS_FILENAME
    return {
        "format": FORMAT,
        "loader": LOADER_VERSION,
        "loader_source": _loader_source_hash(),
        "params": asdict(params),
        "files": files.hexdigest(),
        "num_files": count,
        "labels": _sha256_file(labels) if labels.is_file() else "",
    }


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()


def _text(value: str) -> npt.NDArray[np.uint8]:
    return np.frombuffer(value.encode("utf-8"), dtype=np.uint8)


def _report_dict(report: IngestionReport) -> dict[str, Any]:
    return {
        "files_seen": report.files_seen, "files_used": report.files_used,
        "skipped": [[s.relpath, s.code.value, s.detail] for s in report.skipped],
        "num_patients": report.num_patients, "num_studies": report.num_studies,
        "num_series": report.num_series, "label_counts": dict(report.label_counts),
        "labelled_patients": report.labelled_patients,
        "unmatched_label_rows": report.unmatched_label_rows,
        "require_deidentified": report.require_deidentified,
        "fingerprint": report.fingerprint, "pixels_checked": report.pixels_checked,
        "deidentification_options": dict(report.deidentification_options),
    }


def _report_from(doc: Mapping[str, Any]) -> IngestionReport:
    skipped = tuple(SkippedFile(str(rel), SkipCode(code), str(detail))
                    for rel, code, detail in doc["skipped"])
    return IngestionReport(
        files_seen=int(doc["files_seen"]), files_used=int(doc["files_used"]), skipped=skipped,
        num_patients=int(doc["num_patients"]), num_studies=int(doc["num_studies"]),
        num_series=int(doc["num_series"]),
        label_counts={str(k): int(v) for k, v in doc["label_counts"].items()},
        labelled_patients=int(doc["labelled_patients"]),
        unmatched_label_rows=int(doc["unmatched_label_rows"]),
        require_deidentified=bool(doc["require_deidentified"]),
        fingerprint=str(doc["fingerprint"]), pixels_checked=str(doc["pixels_checked"]),
        deidentification_options={str(k): int(v)
                                  for k, v in doc["deidentification_options"].items()},
    )


def _to_arrays(data: NodeData, key: Mapping[str, Any]) -> dict[str, npt.NDArray[Any]]:
    meta = {"key": key, "fingerprint": data.fingerprint, "image_size": data.image_size,
            "root": data.root,
            "report": _report_dict(data.report),
            "num_patients": {name: getattr(data, name).num_patients for name in _SPLITS}}
    arrays: dict[str, npt.NDArray[Any]] = {"meta": _text(json.dumps(meta, sort_keys=True))}
    for name in _SPLITS:
        split: SplitArrays = getattr(data, name)
        arrays[f"{name}_images"] = split.images.detach().cpu().numpy()
        arrays[f"{name}_labels"] = split.labels.detach().cpu().numpy()
        arrays[f"{name}_patient_index"] = split.patient_index.detach().cpu().numpy()
    return arrays


class _Corrupt(ValueError):
    """A cache entry that does not hold what it should."""


def _split_from(files: Any, name: str, num_patients: int) -> SplitArrays:
    images = np.asarray(files[f"{name}_images"])
    labels = np.asarray(files[f"{name}_labels"])
    owners = np.asarray(files[f"{name}_patient_index"])
    n = images.shape[0] if images.ndim else -1
    if (images.dtype != np.float32 or owners.dtype != np.int64
            or labels.dtype not in (np.int64, np.float32) or labels.ndim < 1
            or labels.shape[0] != n or owners.shape != (n,) or num_patients < 0
            or (n and (owners.min() < 0 or owners.max() >= num_patients))):
        raise _Corrupt(f"split {name} is inconsistent")
    return SplitArrays(images=torch.from_numpy(images), labels=torch.from_numpy(labels),
                       patient_index=torch.from_numpy(owners), num_patients=num_patients)


def _from_file(path: Path, key: Mapping[str, Any]) -> NodeData:
    with np.load(path, allow_pickle=False) as files:
        meta = json.loads(np.asarray(files["meta"]).tobytes().decode("utf-8"))
        if meta.get("key") != json.loads(json.dumps(key)):
            raise _Corrupt("entry of another dataset or loader")
        counts = meta["num_patients"]
        splits = {name: _split_from(files, name, int(counts[name])) for name in _SPLITS}
    return NodeData(report=_report_from(meta["report"]), fingerprint=str(meta["fingerprint"]),
                    image_size=int(meta["image_size"]), root=str(meta.get("root", "")),
                    **splits)


class SplitCache:
    """The on-disk cache of one node (see the module docstring).

    Parameters
    ----------
    directory : Path
        The cache folder (:func:`cache_dir` of the node's ledger folder); created ``0700``.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def load(self, data_dir: Path, params: LoadParams, build: Callable[[], NodeData]) -> NodeData:
        """The cached splits of ``data_dir`` for ``params``, or ``build()`` stored for next time.

        ``build`` is called only when neither the in-process memo nor the disk holds an entry
        of the current key; its exceptions (e.g. :class:`~common.errors.DataError`) propagate
        and nothing is stored.
        """
        root = Path(data_dir).resolve()
        try:
            key = dataset_key(root, params)
        except OSError:  # the folder changes under us: load without the cache
            log.warning("split cache: the data folder changed while it was fingerprinted; "
                        "loading without the cache")
            return build()
        folder_id = _digest({"root": str(root)})[:16]
        params_id = _digest(asdict(params))[:16]
        entry_id = _digest(key)[:32]
        memo_key = (folder_id, entry_id)
        with _memo_lock:
            if memo_key in _memo:
                _memo.move_to_end(memo_key)
                return _memo[memo_key]
        stem = f"{folder_id}-{params_id}"
        path = self.directory / f"{stem}-{entry_id}.npz"
        data = self._read(path, key)
        if data is None:
            data = build()
            self._write(path, stem, data, key)
        with _memo_lock:
            _memo[memo_key] = data
            while len(_memo) > _MEMO_SIZE:
                _memo.popitem(last=False)
        return data

    def _read(self, path: Path, key: Mapping[str, Any]) -> NodeData | None:
        if not path.is_file():
            return None
        try:
            return _from_file(path, key)
        except Exception as exc:  # noqa: BLE001 - a bad entry is rebuilt, never fatal
            log.warning("split cache: an unreadable entry was discarded and will be rebuilt "
                        "(%s)", type(exc).__name__)
            try:
                path.unlink()
            except OSError:
                pass
            return None

    def _ensure_dir(self) -> bool:
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)
        except OSError as exc:
            log.warning("split cache: its folder cannot be used (%s); loading without it",
                        type(exc).__name__)
            return False
        return True

    def _write(self, path: Path, stem: str, data: NodeData, key: Mapping[str, Any]) -> None:
        if not self._ensure_dir():
            return
        tmp_name = ""
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".npz", dir=self.directory)
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **_to_arrays(data, key))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
            tmp_name = ""
        except OSError as exc:
            log.warning("split cache: an entry could not be written (%s)", type(exc).__name__)
            return
        finally:
            if tmp_name:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        self._prune(stem, keep=path)

    def _prune(self, stem: str, *, keep: Path) -> None:
        """Remove the older entries of the same folder and parameters (their files changed)."""
        for old in self.directory.glob(f"{stem}-*.npz"):
            if old != keep:
                try:
                    old.unlink()
                except OSError:
                    pass


_memo: OrderedDict[tuple[str, str], NodeData] = OrderedDict()
_memo_lock = threading.Lock()


def clear_memo() -> None:
    """Forget the in-process memo (tests; the disk entries stay)."""
    with _memo_lock:
        _memo.clear()
