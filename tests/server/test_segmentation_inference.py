"""Pooled segmentation inference against MONAI and SciPy on the pooled patients.

Two hospitals are served in-process by the real ClientApp (``InProcessGrid``); their held-out
splits are built by hand and injected in place of the DICOM loader. The true masks are made
from the (random) U-Net's own predictions, shifted, eroded or erased per patient, so Dice and
HD95 spread over their ranges and every empty-mask case occurs. Per-patient Dice and HD95 on
the pooled patients come from ``monai.metrics`` (and the module's own ``case_metrics``); the
pooled means and t intervals are checked against ``scipy.stats.t``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from monai.metrics import compute_dice, compute_hausdorff_distance
from scipy import ndimage, stats

import client.queries
from client.app import build_plan_model
from client.data.node_data import SplitArrays
from client.queries import handler
from client.queries.registry import QueryRequest
from client.queries.scoring import HeldOutImages
from common import messages as k
from common.config import NodeConfig, TrainPlan
from server.inference_segmentation import segmentation_inference
from tests.client.queries.fake_grid import InProcessGrid

# The segmentation query is registered only for this module's tests (by the autouse fixture
# ``_held_out``), so that other tests' view of the registry (``list_queries()``) does not
# depend on whether this module was collected. Once ``client.queries`` imports the module
# itself, it is registered before this point and nothing is removed.
_BEFORE = set(client.queries.registry._REGISTRY)
import client.queries.segmentation as segmentation_query  # noqa: E402

_QUERIES = {name: client.queries.registry._REGISTRY.pop(name)
            for name in set(client.queries.registry._REGISTRY) - _BEFORE}

PLAN = TrainPlan(task="segmentation", num_classes=2, image_size=16, model="unet", run_id="t")
SITES = {41: "s1", 42: "s2"}
CLIP = 16 * math.sqrt(2)


def _arrays(bias: float = 0.0) -> ArrayRecord:
    torch.manual_seed(5)
    state = build_plan_model(PLAN).state_dict()
    state["net.final_conv.bias"] = torch.tensor([bias, 0.0])  # background logit offset
    return ArrayRecord(state)


def _predicted(arrays: ArrayRecord, images: torch.Tensor) -> np.ndarray:
    model = build_plan_model(PLAN)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        return (model(images).argmax(dim=1) >= 1).numpy()


def _split(arrays: ArrayRecord, seed: int, patients: int) -> SplitArrays:
    """Patients with 1-3 slices; true masks derived from the predictions (see module doc)."""
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(patients), rng.integers(1, 4, size=patients))
    images = torch.as_tensor(rng.standard_normal((index.size, 1, 16, 16)), dtype=torch.float32)
    pred = _predicted(arrays, images)
    masks = np.zeros_like(pred, dtype=np.int64)
    for row, patient in enumerate(index):
        kind = patient % 4
        if kind == 0:  # shifted by a patient-dependent number of pixels
            masks[row] = np.roll(pred[row], shift=1 + patient % 3, axis=1)
        elif kind == 1:  # eroded
            masks[row] = ndimage.binary_erosion(pred[row])
        elif kind == 2:  # dilated
            masks[row] = ndimage.binary_dilation(pred[row])
        # kind 3: no lesion (an empty true mask)
    return SplitArrays(images=images, labels=torch.as_tensor(masks),
                       patient_index=torch.as_tensor(index), num_patients=patients)


@pytest.fixture(scope="module")
def arrays() -> ArrayRecord:
    return _arrays()


@pytest.fixture(scope="module")
def splits(arrays: ArrayRecord) -> dict[str, SplitArrays]:
    return {"s1": _split(arrays, 1, 24), "s2": _split(arrays, 2, 20)}


@pytest.fixture(autouse=True)
def _held_out(splits: dict[str, SplitArrays], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))
    for name, query in _QUERIES.items():
        monkeypatch.setitem(client.queries.registry._REGISTRY, name, query)
    current = dict(splits)

    def images(req: QueryRequest) -> tuple[HeldOutImages, str]:
        return (HeldOutImages(split=current[req.node.site_name], device=torch.device("cpu")),
                f"fingerprint-{req.node.site_name}")

    monkeypatch.setattr(handler, "_images", images)
    yield


def _nodes(tmp_path: Path, **overrides: object) -> dict[int, NodeConfig]:
    settings: dict[str, object] = {"release_histograms": True, "min_release_count": 1,
                                   "device": "cpu"}
    settings.update(overrides)
    return {nid: NodeConfig(data_dir=tmp_path / name, site_name=name,
                            ledger_dir=tmp_path / f"ledger-{name}",
                            **settings)  # type: ignore[arg-type]
            for nid, name in SITES.items()}


def _cases(arrays: ArrayRecord, split: SplitArrays) -> list[tuple[float, float, str]]:
    """Per patient (Dice, HD95 clipped to the diagonal or NaN, empty), from MONAI directly."""
    pred = _predicted(arrays, split.images)
    true = split.labels.numpy() >= 1
    index = split.patient_index.numpy()
    out = []
    for patient in range(split.num_patients):
        p = torch.as_tensor(pred[index == patient])[None, None].float()  # [1, 1, D, H, W]
        t = torch.as_tensor(true[index == patient])[None, None].float()
        empty = ("none", "one", "both")[int(not p.any()) + int(not t.any())]
        if empty == "both":
            out.append((1.0, math.nan, empty))
            continue
        dice = float(compute_dice(p, t, include_background=True, ignore_empty=False)[0, 0])
        hd = math.nan
        if empty == "none":
            hd = min(float(compute_hausdorff_distance(p, t, include_background=True,
                                                      percentile=95)[0, 0]), CLIP)
        out.append((dice, hd, empty))
    return out


def _t(values: np.ndarray, lo: float, hi: float) -> tuple[float, float]:
    low, high = stats.t.interval(0.95, values.size - 1, loc=values.mean(),
                                 scale=stats.sem(values))
    return max(lo, float(low)), min(hi, float(high))


HD95_REL = 1e-5  # MONAI returns float32 distances


def test_pooled_dice_and_hd95_equal_monai_and_scipy_on_the_pooled_patients(
    arrays: ArrayRecord, splits: dict[str, SplitArrays], tmp_path: Path,
) -> None:
    # Prepare
    nodes = _nodes(tmp_path)
    per_site = [_cases(arrays, splits[name]) for name in SITES.values()]
    cases = [c for site in per_site for c in site]
    dice = np.array([c[0] for c in cases])
    hd = np.array([c[1] for c in cases if c[2] == "none"])
    assert 0.1 < dice.mean() < 0.95 and hd.size > 10 and np.ptp(hd) > 0.5  # spread out
    # Execute
    sec = segmentation_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: pooled means and t intervals ...
    assert sec["status"] == "completed" and sec["failures"] == [] and not sec["noised"]
    assert sec["task"] == "segmentation" and sec["n"] == 44 and sec["sites"] == ["s1", "s2"]
    seg = sec["segmentation"]
    assert seg["dice"]["value"] == pytest.approx(dice.mean(), rel=1e-6)
    assert (seg["dice"]["lower"], seg["dice"]["upper"]) == pytest.approx(
        _t(dice, 0.0, 1.0), rel=1e-6)
    assert seg["hd95"]["n"] == hd.size
    assert seg["hd95"]["value"] == pytest.approx(hd.mean(), rel=HD95_REL)
    assert (seg["hd95"]["lower"], seg["hd95"]["upper"]) == pytest.approx(
        _t(hd, 0.0, math.inf), rel=HD95_REL)
    # ... the empty-mask counts (patients of kind 3 have no lesion) ...
    assert seg["n_empty_one"] == sum(c[2] == "one" for c in cases) > 0
    assert seg["n_empty_both"] == sum(c[2] == "both" for c in cases)
    # ... and each site's own summary.
    for row, site_cases in zip(seg["per_site"], per_site, strict=True):
        d = np.array([c[0] for c in site_cases])
        h = np.array([c[1] for c in site_cases if c[2] == "none"])
        assert row["n"] == d.size and row["hd95"]["n"] == h.size
        assert row["dice"]["value"] == pytest.approx(d.mean(), rel=1e-6)
        assert row["hd95"]["value"] == pytest.approx(h.mean(), rel=HD95_REL)
        assert (row["dice"]["lower"], row["dice"]["upper"]) == pytest.approx(
            _t(d, 0.0, 1.0), rel=1e-6)
    assert [row["site"] for row in seg["per_site"]] == ["s1", "s2"]
    assert sec["hd95_units"] == "pixels of the model's input grid"


def test_a_model_that_finds_nothing_counts_both_kinds_of_empty_case(tmp_path: Path) -> None:
    # Prepare: a background logit so large that no pixel is ever predicted foreground
    nodes = _nodes(tmp_path)
    empty_model = _arrays(bias=1e3)
    # Execute
    sec = segmentation_inference(InProcessGrid(nodes), list(nodes), empty_model, PLAN,
                                 timeout=5)
    # Assert: the patients without a lesion (1 in 4: patients 3, 7, ...) score Dice 1, the
    # others Dice 0, and no HD95 is defined.
    seg = sec["segmentation"]
    without = 6 + 5  # patient % 4 == 3 among 24 and 20 patients
    assert seg["n_empty_both"] == without and seg["n_empty_one"] == 44 - without
    assert seg["dice"]["value"] == pytest.approx(without / 44)
    assert seg["hd95"]["n"] == 0 and seg["hd95"]["value"] is None


def test_refusals_become_failures_and_never_raise(arrays: ArrayRecord, tmp_path: Path) -> None:
    # Prepare: s2 (20 patients) refuses under a minimum release count of 22; then a plan of
    # another task, which every node refuses
    nodes = _nodes(tmp_path, min_release_count=22)
    regression = TrainPlan(task="regression", image_size=16, model="cnn", run_id="t")
    # Execute
    partial = segmentation_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN,
                                     timeout=5)
    failed = segmentation_inference(InProcessGrid(nodes), list(nodes), arrays, regression,
                                    timeout=5)
    # Assert
    assert partial["status"] == "completed" and partial["sites"] == ["s1"]
    assert partial["n"] == 24 and "1 of 2 sites" in partial["note"]
    assert "minimum release count" in partial["failures"][0]["reason"]
    assert failed["status"] == "failed" and len(failed["failures"]) == 2
    assert all("serves the segmentation task" in f["reason"] for f in failed["failures"])


def test_declared_sensitivities_bound_dice_and_the_clipped_hd95() -> None:
    # Prepare
    req = QueryRequest(name="segmentation-metrics", node=NodeConfig(data_dir=Path(".")),
                       plan=PLAN, split=k.SPLIT_TEST, config=ConfigRecord({}),
                       content=RecordDict())
    # Execute
    declared = {s.key: s for s in segmentation_query.SegmentationMetricsQuery().statistics(req)}
    # Assert: Dice in [0, 1]; HD95 clipped to the 16 px image's diagonal
    assert declared[k.SEG_SUM_DICE].sensitivity == 1.0
    assert declared[k.SEG_SUM_DICE_SQ].sensitivity == 1.0
    assert declared[k.SEG_SUM_HD95].sensitivity == pytest.approx(CLIP)
    assert declared[k.SEG_SUM_HD95_SQ].sensitivity == pytest.approx(CLIP**2)
    assert declared[k.SEG_EMPTY_ONE].small_cells and declared[k.SEG_EMPTY_BOTH].small_cells


def test_hd95_is_clipped_to_the_diagonal() -> None:
    # Prepare: two single-pixel masks 20 slices apart; at a slice spacing of 2 pixels they lie
    # 40 pixels apart, beyond the 16 px image's diagonal (22.6)
    pred = np.zeros((21, 16, 16), dtype=bool)
    true = np.zeros_like(pred)
    pred[0, 3, 3] = True
    true[20, 3, 3] = True
    # Execute
    (case,) = segmentation_query.patient_cases(pred, true, np.zeros(21, dtype=np.int64),
                                               spacing=(2.0, 1.0, 1.0), clip=CLIP)
    # Assert
    assert case.hd95 == pytest.approx(CLIP) and case.dice == 0.0


def test_noised_releases_are_charged_and_still_pooled(arrays: ArrayRecord,
                                                       tmp_path: Path) -> None:
    # Prepare: hospitals that noise every statistic (and charge it to their ledgers)
    from client.privacy_guard import NodeBudget

    nodes = _nodes(tmp_path, stats_noise_multiplier=1.0, epsilon_cap=50.0)
    # Execute
    sec = segmentation_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    # Assert: flagged noised, charged at patient level, a pooled Dice still computed
    assert sec["status"] == "completed" and sec["noised"] and sec["failures"] == []
    assert sec["segmentation"]["dice"]["value"] is not None
    for node in nodes.values():
        entries = NodeBudget.for_node(node).ledger.entries(f"fingerprint-{node.site_name}")
        assert [(e.release, e.level) for e in entries] == [
            ("query:segmentation-metrics", "patient")]


def test_secure_aggregation_gives_the_plain_sections_numbers(tmp_path: Path,
                                                             arrays: ArrayRecord) -> None:
    from server.inference_secure import HIDDEN, secure_queries
    from tests.server.test_secure_inference import (
        StageGrid,
        _clear_per_site_values,
        assert_same_section,
    )

    nodes = _nodes(tmp_path)
    plain = segmentation_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5)
    grid = StageGrid(nodes)
    with secure_queries(True, min_survivors=2):  # two hospitals: no dropout can be tolerated
        sec = segmentation_inference(grid, list(nodes), arrays, PLAN, timeout=5)
    assert sec["status"] == "completed" and sec["failures"] == []
    assert_same_section(sec, plain)
    assert sec["segmentation"]["per_site"] == HIDDEN and sec["secure_aggregation"]["covered"]
    assert _clear_per_site_values(grid) == []
    # the HTML report and the CLI view render the section, saying the rows are hidden
    from cli.report_view import print_inference
    from server.report_html import render_report_html

    text = render_report_html({"status": "completed", "inference": sec},
                              tmp_path / "report.html").read_text()
    assert "hidden by secure aggregation" in text
    print_inference(sec)
