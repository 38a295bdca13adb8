"""Pooled regression inference against scikit-learn and SciPy on the pooled patients.

Two hospitals are served in-process by the real ClientApp (``InProcessGrid``); their held-out
splits are built by hand (random images, targets tied to the model's own predictions so that
R² and r are far from 0) and injected in place of the DICOM loader. Every pooled estimate is
compared with the same computation on the pooled per-patient (clipped) values:
``mean_absolute_error``, ``mean_squared_error``, ``r2_score``, ``pearsonr`` and Student t
intervals from ``scipy.stats``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from scipy import stats
from sklearn.metrics import mean_absolute_error, mean_squared_error, r2_score

import client.queries
from client.app import build_plan_model, plan_task
from client.data.node_data import SplitArrays
from client.queries import handler
from client.queries.registry import QueryRequest
from client.queries.scoring import HeldOutImages
from common import messages as k
from common.config import NodeConfig, TrainPlan
from server.inference_regression import regression_inference
from tests.client.queries.fake_grid import InProcessGrid

# The regression query is registered only for this module's tests (by the autouse fixture
# ``_held_out``), so that other tests' view of the registry (``list_queries()``) does not
# depend on whether this module was collected. Once ``client.queries`` imports the module
# itself, it is registered before this point and nothing is removed.
_BEFORE = set(client.queries.registry._REGISTRY)
import client.queries.regression as regression_query  # noqa: E402

_QUERIES = {name: client.queries.registry._REGISTRY.pop(name)
            for name in set(client.queries.registry._REGISTRY) - _BEFORE}

PLAN = TrainPlan(task="regression", image_size=16, model="cnn", run_id="t")
LOWER, UPPER, BINS = 0.0, 60.0, 20
SITES = {31: "r1", 32: "r2"}


def _arrays() -> ArrayRecord:
    torch.manual_seed(3)
    state = build_plan_model(PLAN).state_dict()
    last_w = [key for key in state if key.endswith("weight")][-1]
    last_b = [key for key in state if key.endswith("bias")][-1]
    state[last_w] = state[last_w] * 140.0  # predictions spread over ~25 +- 10
    state[last_b] = torch.zeros_like(state[last_b])
    probe = torch.as_tensor(np.random.default_rng(0).standard_normal((64, 1, 16, 16)),
                            dtype=torch.float32)
    state[last_b] += 25.0 - float(_predict(ArrayRecord(state), probe).mean())
    return ArrayRecord(state)


def _predict(arrays: ArrayRecord, images: torch.Tensor) -> np.ndarray:
    model = build_plan_model(PLAN)
    model.load_state_dict(arrays.to_torch_state_dict())
    model.eval()
    with torch.no_grad():
        return plan_task(PLAN).predict(model(images)).double().numpy()


def _split(arrays: ArrayRecord, seed: int, patients: int) -> SplitArrays:
    """Patients with 1-3 images; each image's target = its patient's mean prediction + noise."""
    rng = np.random.default_rng(seed)
    index = np.repeat(np.arange(patients), rng.integers(1, 4, size=patients))
    images = torch.as_tensor(rng.standard_normal((index.size, 1, 16, 16)), dtype=torch.float32)
    pred = _predict(arrays, images)
    per_patient = np.bincount(index, weights=pred) / np.bincount(index)
    targets = 0.8 * per_patient[index] + 4.0 + rng.normal(0.0, 3.0, size=index.size)
    targets[index == 0] = 95.0  # one patient's target far above the clipping range
    return SplitArrays(images=images, labels=torch.as_tensor(targets, dtype=torch.float32),
                       patient_index=torch.as_tensor(index), num_patients=patients)


@pytest.fixture(scope="module")
def arrays() -> ArrayRecord:
    return _arrays()


@pytest.fixture(scope="module")
def splits(arrays: ArrayRecord) -> dict[str, SplitArrays]:
    return {"r1": _split(arrays, 1, 40), "r2": _split(arrays, 2, 30)}


@pytest.fixture(autouse=True)
def _held_out(splits: dict[str, SplitArrays], tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("VESALIUS_HOME", str(tmp_path / "home"))
    for name, query in _QUERIES.items():
        monkeypatch.setitem(client.queries.registry._REGISTRY, name, query)

    def images(req: QueryRequest) -> tuple[HeldOutImages, str]:
        return (HeldOutImages(split=splits[req.node.site_name], device=torch.device("cpu")),
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


def _patients(arrays: ArrayRecord, split: SplitArrays) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient (clipped target, clipped prediction), computed directly."""
    index = split.patient_index.numpy()
    counts = np.bincount(index)
    pred = np.bincount(index, weights=_predict(arrays, split.images)) / counts
    y = np.bincount(index, weights=split.labels.double().numpy()) / counts
    return np.clip(y, LOWER, UPPER), np.clip(pred, LOWER, UPPER)


def _t_interval(values: np.ndarray) -> tuple[float, float]:
    lo, hi = stats.t.interval(0.95, values.size - 1, loc=values.mean(),
                              scale=stats.sem(values))
    return float(lo), float(hi)


def test_pooled_regression_metrics_equal_sklearn_and_scipy_on_the_pooled_patients(
    arrays: ArrayRecord, splits: dict[str, SplitArrays], tmp_path: Path,
) -> None:
    # Prepare
    nodes = _nodes(tmp_path)
    parts = [_patients(arrays, splits[name]) for name in SITES.values()]
    y = np.concatenate([p[0] for p in parts])
    p = np.concatenate([p[1] for p in parts])
    e = p - y
    assert y.max() == UPPER and np.ptp(p) > 10  # the range clips one target; spread-out values
    # Execute
    sec = regression_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5,
                               value_lower=LOWER, value_upper=UPPER, abs_error_bins=BINS)
    # Assert: the point estimates ...
    assert sec["status"] == "completed" and sec["failures"] == [] and sec["task"] == "regression"
    assert sec["n"] == y.size == 70 and sec["sites"] == ["r1", "r2"] and not sec["noised"]
    reg = sec["regression"]
    assert reg["mae"]["value"] == pytest.approx(mean_absolute_error(y, p), rel=1e-12)
    assert reg["mse"] == pytest.approx(mean_squared_error(y, p), rel=1e-12)
    assert reg["rmse"] == pytest.approx(np.sqrt(mean_squared_error(y, p)), rel=1e-12)
    assert reg["r2"] == pytest.approx(r2_score(y, p), rel=1e-9)
    pearson = stats.pearsonr(y, p)
    assert reg["pearson_r"]["value"] == pytest.approx(pearson.statistic, rel=1e-9)
    ci = pearson.confidence_interval(0.95)
    assert (reg["pearson_r"]["lower"], reg["pearson_r"]["upper"]) == pytest.approx(
        (ci.low, ci.high), rel=1e-9)
    # ... the t intervals of the MAE and of the Bland-Altman bias ...
    assert (reg["mae"]["lower"], reg["mae"]["upper"]) == pytest.approx(
        _t_interval(np.abs(e)), rel=1e-9)
    assert reg["bias"]["value"] == pytest.approx(e.mean(), rel=1e-9)
    assert (reg["bias"]["lower"], reg["bias"]["upper"]) == pytest.approx(_t_interval(e),
                                                                        rel=1e-9)
    # ... the limits of agreement (Bland & Altman 1999: se = s sqrt(1/n + z^2 / (2 (n-1)))) ...
    s, n = e.std(ddof=1), e.size
    se = s * np.sqrt(1 / n + 1.96**2 / (2 * (n - 1)))
    q = stats.t.ppf(0.975, n - 1)
    for key, limit in (("loa_lower", e.mean() - 1.96 * s), ("loa_upper", e.mean() + 1.96 * s)):
        assert reg[key]["value"] == pytest.approx(limit, rel=1e-9)
        assert (reg[key]["lower"], reg[key]["upper"]) == pytest.approx(
            (limit - q * se, limit + q * se), rel=1e-9)
    ba = reg["bland_altman"]
    assert ba["bias"] == reg["bias"] and ba["z"] == 1.96
    assert ba["sd_difference"] == pytest.approx(s, rel=1e-9)
    # ... the |error| histogram and the bin holding the median ...
    hist = reg["abs_error_histogram"]
    edges = np.linspace(0.0, UPPER - LOWER, BINS + 1)
    assert hist["edges"] == pytest.approx(edges.tolist())
    assert hist["counts"] == np.histogram(np.abs(e), bins=edges)[0].tolist()
    median = np.quantile(np.abs(e), 0.5, method="inverted_cdf")
    med = reg["median_abs_error"]
    assert med["lower"] <= median < med["upper"] and med["upper"] - med["lower"] == 3.0
    # ... and each site's own MAE and bias.
    for row, (y_site, p_site) in zip(reg["per_site"], parts, strict=True):
        assert row["n"] == y_site.size
        assert row["mae"] == pytest.approx(mean_absolute_error(y_site, p_site), rel=1e-12)
        assert row["bias"] == pytest.approx(np.mean(p_site - y_site), rel=1e-9)
    assert sec["value_range"] == {"lower": LOWER, "upper": UPPER, "units": "target units"}


def test_a_refusing_node_is_a_failure_and_the_others_are_pooled(
    arrays: ArrayRecord, splits: dict[str, SplitArrays], tmp_path: Path,
) -> None:
    # Prepare: r2 (30 patients) requires 35 for an exact release; r1 (40) does not.
    nodes = _nodes(tmp_path, min_release_count=35)
    y, p = _patients(arrays, splits["r1"])
    # Execute
    sec = regression_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5,
                               value_lower=LOWER, value_upper=UPPER, abs_error_bins=BINS)
    # Assert: one failure naming the rule, r1 alone pooled, no exception
    assert sec["status"] == "completed" and sec["sites"] == ["r1"] and sec["n"] == 40
    assert len(sec["failures"]) == 1 and sec["failures"][0]["node_id"] == 32
    assert "[r2]" in sec["failures"][0]["reason"]  # the node names its site in its refusal
    assert "minimum release count" in sec["failures"][0]["reason"]
    assert "1 of 2 sites" in sec["note"]
    assert sec["regression"]["mae"]["value"] == pytest.approx(mean_absolute_error(y, p))
    # small |error| cells (1..34 patients) were suppressed in r1's histogram
    assert sec["suppressed_cells"] > 0 and "suppressed" in sec["note"]
    assert all(c == 0 or c >= 35 for c in sec["regression"]["abs_error_histogram"]["counts"])


def test_every_node_refusing_fails_the_section_without_raising(
    arrays: ArrayRecord, tmp_path: Path,
) -> None:
    # Prepare: a binary plan: the regression query refuses it at every node
    nodes = _nodes(tmp_path)
    binary = TrainPlan(task="binary", image_size=16, model="cnn", run_id="t")
    # Execute
    sec = regression_inference(InProcessGrid(nodes), list(nodes), arrays, binary, timeout=5)
    # Assert
    assert sec["status"] == "failed" and "regression-metrics" in sec["reason"]
    assert len(sec["failures"]) == 2
    assert all("serves the regression task" in f["reason"] for f in sec["failures"])


def _request(config: dict[str, object], plan: TrainPlan = PLAN) -> QueryRequest:
    return QueryRequest(name="regression-metrics", node=NodeConfig(data_dir=Path(".")),
                        plan=plan, split=k.SPLIT_TEST, config=ConfigRecord(config),
                        content=RecordDict())


def test_declared_sensitivities_follow_the_clipping_range() -> None:
    # Prepare: R = max(|-10|, |50|) = 50, W = 60
    req = _request({k.VALUE_LOWER: -10.0, k.VALUE_UPPER: 50.0, k.ABS_ERROR_BINS: 12})
    # Execute
    declared = {s.key: s for s in regression_query.RegressionMetricsQuery().statistics(req)}
    # Assert
    assert declared[k.REG_SUM_Y].sensitivity == 50.0
    assert declared[k.REG_SUM_PRED].sensitivity == 50.0
    assert declared[k.REG_SUM_Y2].sensitivity == 2500.0
    assert declared[k.REG_SUM_Y_PRED].sensitivity == 2500.0
    assert declared[k.REG_SUM_ABS_ERROR].sensitivity == 60.0
    assert declared[k.REG_SUM_ERROR].sensitivity == 60.0
    assert declared[k.REG_SUM_SQ_ERROR].sensitivity == 3600.0
    hist = declared[k.REG_ABS_ERROR_HIST]
    assert hist.shape == (12,) and hist.small_cells and hist.sensitivity == 1.0


@pytest.mark.parametrize("config", [
    {k.VALUE_LOWER: 5.0, k.VALUE_UPPER: 5.0},
    {k.VALUE_LOWER: float("nan")},
    {k.VALUE_UPPER: 1e9},
    {k.ABS_ERROR_BINS: 0},
    {k.ABS_ERROR_BINS: 10_000},
])
def test_a_malformed_range_is_refused_with_a_safe_reason(config: dict[str, object]) -> None:
    from common.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        regression_query.value_range(_request(config))
    assert info.value.safe_reason.startswith("malformed query")


def test_noised_releases_are_charged_and_still_pooled(arrays: ArrayRecord,
                                                       tmp_path: Path) -> None:
    # Prepare: hospitals that noise every statistic (and charge it to their ledgers)
    from client.privacy_guard import NodeBudget

    nodes = _nodes(tmp_path, stats_noise_multiplier=1.0, epsilon_cap=50.0)
    # Execute
    sec = regression_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5,
                               value_lower=LOWER, value_upper=UPPER, abs_error_bins=BINS)
    # Assert: flagged noised, charged at patient level, the estimates still computed
    assert sec["status"] == "completed" and sec["noised"] and sec["failures"] == []
    reg = sec["regression"]
    assert reg["mae"]["value"] is not None and reg["bland_altman"]["bias"]["value"] is not None
    assert reg["abs_error_histogram"] is not None
    for node in nodes.values():
        entries = NodeBudget.for_node(node).ledger.entries(f"fingerprint-{node.site_name}")
        assert [(e.release, e.level) for e in entries] == [
            ("query:regression-metrics", "patient")]


def test_secure_aggregation_gives_the_plain_sections_numbers(tmp_path: Path,
                                                             arrays: ArrayRecord) -> None:
    from server.inference_secure import HIDDEN, secure_queries
    from tests.server.test_secure_inference import (
        StageGrid,
        _clear_per_site_values,
        assert_same_section,
    )

    nodes = _nodes(tmp_path)
    plain = regression_inference(InProcessGrid(nodes), list(nodes), arrays, PLAN, timeout=5,
                   value_lower=LOWER, value_upper=UPPER, abs_error_bins=BINS)
    grid = StageGrid(nodes)
    with secure_queries(True, min_survivors=2):  # two hospitals: no dropout can be tolerated
        sec = regression_inference(grid, list(nodes), arrays, PLAN, timeout=5,
                   value_lower=LOWER, value_upper=UPPER, abs_error_bins=BINS)
    assert sec["status"] == "completed" and sec["failures"] == []
    assert_same_section(sec, plain)
    assert sec["regression"]["per_site"] == HIDDEN and sec["secure_aggregation"]["covered"]
    assert _clear_per_site_values(grid) == []
    # the HTML report and the CLI view render the section, saying the rows are hidden
    from cli.report_view import print_inference
    from server.report_html import render_report_html

    text = render_report_html({"status": "completed", "inference": sec},
                              tmp_path / "report.html").read_text()
    assert "hidden by secure aggregation" in text
    print_inference(sec)
