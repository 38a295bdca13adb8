"""The multi-task bench's hospitals: the real MSD patches as DICOM image + mask pairs that a
node's segmentation loader reads back unchanged (every patch, its mask, dealt to 3 sites)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


@pytest.mark.slow
def test_msd_patches_become_hospitals_a_node_reads(
        tmp_path: Path, shared_file: Callable[[str], Path]) -> None:
    # Prepare
    from bench.paradigm_cases.multi_task import prepare_hospitals
    from bench.tasks import MSD_DIR, _msd_arrays
    from client.data.task_data import load_task_data

    for name in ("val_patches.h5", "test_patches.h5"):
        shared_file(f"{MSD_DIR}/{name}")
    # Execute
    written = prepare_hospitals(tmp_path)
    loaded = [load_task_data(site, task="segmentation", samples="image-2d", image_size=48,
                             seed=0) for site in sorted(tmp_path.glob("site-*"))]
    # Assert: 260 studies over 3 sites; every mask read back (lesion pixel total unchanged)
    assert written["patients_per_site"] == [87, 87, 86]
    splits = [getattr(nd, part) for nd in loaded for part in ("train", "val", "test")]
    assert sum(s.num_patients for s in splits) == 260
    source = sum(int(_msd_arrays(n)[1].sum()) for n in ("val_patches.h5", "test_patches.h5"))
    assert sum(int(s.labels.sum()) for s in splits) == source
    assert all(np.isin(s.labels.unique().numpy(), [0, 1]).all() for s in splits if len(s))
