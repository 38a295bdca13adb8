"""`federation run|cv --task/--num-classes`: options, checks before anything starts, the
multi-class table on screen, and a simulated three-class federation through the CLI whose
pooled numbers equal scikit-learn's on the pooled held-out patients."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)
from typer.testing import CliRunner

from cli.app import app
from cli.console import console
from cli.federation import build_run_config
from cli.report_view import print_inference, print_report
from common import messages as k
from common.config import RunConfig
from common.errors import ConfigError
from common.tasks.federated import FEDERATED_TASKS, federated_task

ROOT = Path(__file__).resolve().parents[2]


def _config(**kwargs: object) -> RunConfig:
    base: dict[str, object] = dict(
        rounds=1, local_epochs=1, batch_size=8, learning_rate=0.05, epsilon=8.0,
        noise_multiplier=0.0, max_grad_norm=1.0, private=True, model="cnn", image_size=32,
        seed=0, out=Path("o"), min_nodes=2)
    base.update(kwargs)
    return build_run_config(**base)  # type: ignore[arg-type]


def test_task_and_classes_reach_the_run_config_and_back() -> None:
    # Execute
    default, multi = _config(), _config(task="multiclass", num_classes=4)
    # Assert
    assert default.plan.task == "binary" and default.plan.num_classes == 2
    assert multi.to_dict()[k.TASK] == "multiclass" and multi.to_dict()[k.NUM_CLASSES] == 4
    back = RunConfig.from_user_config(multi.to_dict()).plan
    assert (back.task, back.num_classes) == ("multiclass", 4)


def test_every_plan_key_is_listed_in_the_flower_run_config() -> None:
    # Prepare: a SuperLink refuses run-config keys the app does not list
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    # Assert
    assert listed[k.TASK] == "binary" and listed[k.NUM_CLASSES] == 2
    assert set(_config(task="multiclass", num_classes=3).to_dict()) <= set(listed)


def test_a_model_that_does_not_serve_the_task_is_refused_naming_those_that_do() -> None:
    with pytest.raises(ConfigError, match="models for multiclass: .*cnn"):
        _config(model="unet", task="multiclass", num_classes=3)


def test_every_registered_task_is_federated_and_unknown_ones_are_refused() -> None:
    from common.tasks import list_tasks

    assert set(FEDERATED_TASKS) == {t.info.name for t in list_tasks()}
    with pytest.raises(ConfigError, match="unknown task"):
        federated_task("nonsense")


def test_a_sample_kind_the_model_does_not_read_is_refused_naming_those_it_does() -> None:
    with pytest.raises(ConfigError, match="it serves it on: volume-3d"):
        _config(model="cnn3d", task="binary", samples="image-2d")
    with pytest.raises(ConfigError, match="image-2d, volume-3d, series"):
        _config(model="lstm", task="binary", samples="nonsense")


@pytest.mark.parametrize(("args", "expected"), [
    (["--task", "clustering"], "--task"),
    (["--task", "binary", "--num-classes", "3"], "binary task has 2 classes"),
    (["--task", "multiclass", "--num-classes", "1"], "--num-classes"),
])
@pytest.mark.parametrize("command", ["run", "cv"])
def test_bad_tasks_and_class_counts_are_usage_errors(
    command: str, args: list[str], expected: str, tmp_path: Path
) -> None:
    # Prepare
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    base = ["federation", command, "--data-root", str(tmp_path / "data"), "--out",
            str(tmp_path / "o")] + (["--folds", "2"] if command == "cv" else [])
    # Execute
    result = CliRunner().invoke(app, [*base, *args], terminal_width=200)
    # Assert
    assert result.exit_code == 2 and expected in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["run", "cv"])
def test_help_lists_the_federated_tasks(command: str) -> None:
    result = CliRunner().invoke(app, ["federation", command, "--help"],
                                env={"COLUMNS": "300"})
    assert result.exit_code == 0 and f"[{'|'.join(FEDERATED_TASKS)}]" in result.output
    assert "--num-classes" in result.output


def _est(value: float, lo: float | None = None, hi: float | None = None) -> dict[str, object]:
    return {"value": value, "lower": lo, "upper": hi}


SECTION = {
    "task": "multiclass", "status": "completed", "n": 90, "classes": 3,
    "sites": ["site-1", "site-2"], "decision": "argmax", "failures": [],
    "multiclass": {
        "confusion": [[20, 5, 5], [4, 22, 4], [6, 6, 18]], "class_counts": [30, 30, 30],
        "accuracy": _est(0.6667, 0.5640, 0.7556), "balanced_accuracy": _est(0.6667, 0.57, 0.76),
        "sensitivity": [_est(0.6667, 0.49, 0.81), _est(0.7333, 0.55, 0.86), _est(0.6, 0.42, 0.75)],
        "precision": [_est(0.6667, 0.49, 0.81), _est(0.6667, 0.49, 0.81), _est(0.6667, 0.47, 0.82)],
        "auc": {"macro": _est(0.812, 0.751, 0.873),
                "per_class": [_est(0.8), _est(0.85), _est(0.786)]},
    },
}


def test_the_terminal_shows_the_multiclass_table_instead_of_the_binary_one() -> None:
    # Execute
    with console.capture() as cap:
        print_inference(SECTION)
        print_report({"config": {k.TASK: "multiclass"}, "status": "completed",
                      "final": {"metrics": {k.AUC: 0.8}, "sites": []},
                      "rounds": [{"round": 1, "metrics": {k.AUC: 0.75}}]})
    text = " ".join(cap.get().split())
    # Assert
    assert "macro AUC (one-vs-rest) │ 0.812 (0.751–0.873)" in text
    assert "balanced accuracy" in text and "arg-max class" in text
    assert "Operating point" not in text and "specificity" not in text
    assert "Final test macro AUC (one-vs-rest), weighted mean of sites: 0.800" in text
    assert "rows: true class, columns: arg-max class" in text
    assert "│ 1 │ 4 │ 22 │ 4 │" in text  # the confusion matrix's second row
    assert "┃ round ┃ macro AUC (one-vs-rest) ┃" in text


# --- end to end: a simulated three-class federation through the CLI ----------------------------


def _pooled_test_probabilities(data: Path, doc: dict, final: dict) -> tuple[np.ndarray, np.ndarray]:
    from client.app import _load, build_plan_model, heldout_split, plan_task
    from client.training import evaluate
    from common.config import NodeConfig, TrainPlan

    plan = TrainPlan.from_record(doc["config"])
    model = build_plan_model(plan)
    model.load_state_dict(final)
    probs, labels = [], []
    for site in sorted(data.glob("site-*")):
        node = NodeConfig(data_dir=site, site_name=site.name, device="cpu")
        part = heldout_split(node, plan, _load(node, plan), k.SPLIT_TEST)
        res = evaluate(model, part.images, part.labels, patient_index=part.patient_index,
                       device="cpu", task=plan_task(plan), num_classes=plan.num_classes)
        probs.append(res.scores)
        labels.append(res.labels)
    return np.concatenate(probs), np.concatenate(labels)


@pytest.mark.slow
def test_a_multiclass_run_reports_pooled_metrics_equal_to_sklearn(tmp_path: Path) -> None:
    from common.stats.bins import fine_score_edges, score_bin_index
    from tests.server.multiclass_federation import write_three_class_federation

    # Prepare
    data = tmp_path / "data"
    write_three_class_federation(data, n_sites=3, patients_per_site=80, image_size=16)
    out = tmp_path / "run"
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "2", "--min-nodes", "3",
        "--task", "multiclass", "--num-classes", "3", "--image-size", "16", "--out", str(out),
        "--ledger-dir", str(tmp_path / "l"), "--min-release-count", "1"], terminal_width=200)
    # Assert: the run completed, the report records the task, and the screen shows its table
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    assert doc["config"][k.TASK] == "multiclass" and doc["config"][k.NUM_CLASSES] == 3
    inf = doc["inference"]
    assert inf["task"] == "multiclass" and inf["status"] == "completed", inf
    assert inf["failures"] == [] and inf["decision"] == "argmax"
    screen = " ".join(result.output.split())
    assert "macro AUC (one-vs-rest)" in screen and "Operating point" not in screen
    assert all(np.isfinite(r["metrics"][k.ACCURACY]) for r in doc["rounds"])
    # ... and every pooled number equals scikit-learn's on the pooled test patients, scored
    # here directly by the final model at every site.
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    probs, y = _pooled_test_probabilities(data, doc, final)
    pred = probs.argmax(axis=1)
    mc = inf["multiclass"]
    assert inf["n"] == y.size
    assert mc["confusion"] == confusion_matrix(y, pred, labels=[0, 1, 2]).tolist()
    assert mc["accuracy"]["value"] == pytest.approx(accuracy_score(y, pred))
    assert mc["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(y, pred))
    recall = recall_score(y, pred, labels=[0, 1, 2], average=None, zero_division=np.nan)
    precision = precision_score(y, pred, labels=[0, 1, 2], average=None, zero_division=np.nan)
    np.testing.assert_allclose([np.nan if e["value"] is None else e["value"]
                                for e in mc["sensitivity"]], recall)
    np.testing.assert_allclose([np.nan if e["value"] is None else e["value"]
                                for e in mc["precision"]], precision)
    binned = np.stack([score_bin_index(probs[:, c], fine_score_edges()) for c in range(3)], 1)
    aucs = [roc_auc_score(y == c, binned[:, c]) for c in range(3)]
    np.testing.assert_allclose([e["value"] for e in mc["auc"]["per_class"]], aucs, atol=1e-12)
    macro = mc["auc"]["macro"]
    # three hospitals: the sums travel securely, as 32.32 fixed point (error <= n * 2**-33)
    assert macro["value"] == pytest.approx(np.mean(aucs), abs=1e-9)
    assert macro["lower"] <= macro["value"] <= macro["upper"]
