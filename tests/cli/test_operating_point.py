"""`--target-sensitivity`, the operating point on screen, and a run whose test metrics are at it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cli.app import app
from cli.console import console
from cli.federation import build_run_config
from cli.report_view import print_inference, print_report
from common.config import RunConfig
from common.messages import TARGET_SENSITIVITY
from common.errors import ConfigError


def _config(**kwargs: object) -> RunConfig:
    base: dict[str, object] = dict(
        rounds=1, local_epochs=1, batch_size=8, learning_rate=0.05, epsilon=8.0,
        noise_multiplier=0.0, max_grad_norm=1.0, private=True, model="cnn", image_size=32,
        seed=0, out=Path("o"), min_nodes=2)
    base.update(kwargs)
    return build_run_config(**base)  # type: ignore[arg-type]


def test_target_sensitivity_reaches_the_run_config_and_back() -> None:
    # Execute
    default, target = _config(), _config(target_sensitivity=0.85)
    # Assert
    assert default.target_sensitivity == 0.0 and default.to_dict()[TARGET_SENSITIVITY] == 0.0
    assert target.target_sensitivity == 0.85 and target.to_dict()[TARGET_SENSITIVITY] == 0.85
    assert RunConfig.from_user_config(target.to_dict()).target_sensitivity == 0.85


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_a_target_outside_the_unit_interval_is_refused(value: float) -> None:
    with pytest.raises(ConfigError, match="target-sensitivity"):
        RunConfig(target_sensitivity=value)


@pytest.mark.parametrize("value", ["0", "1.2", "x"])
@pytest.mark.parametrize("command", ["run", "cv"])
def test_bad_target_sensitivity_is_a_usage_error(command: str, value: str, tmp_path: Path) -> None:
    (tmp_path / "data" / "site-1").mkdir(parents=True)
    args = ["federation", command, "--data-root", str(tmp_path / "data"), "--out",
            str(tmp_path / "o"), "--target-sensitivity", value]
    result = CliRunner().invoke(app, args + (["--folds", "2"] if command == "cv" else []))
    assert result.exit_code == 2 and "--target-sensitivity" in result.output
    assert not (tmp_path / "o").exists()


SECTION = {
    "status": "completed", "n": 120, "sites": ["site-1", "site-2"],
    "metrics": {"sensitivity": {"value": 0.85, "lower": 0.7, "upper": 0.93},
                "specificity": {"value": 0.82, "lower": 0.72, "upper": 0.9},
                "brier": 0.11, "ece": 0.04},
    "operating_point": {"method": "target-sensitivity", "target_sensitivity": 0.85,
                        "calibrated_threshold": 0.3127, "threshold": 0.0812,
                        "calibration": "platt", "temperature": 1.7, "intercept": 0.9,
                        "slope": 0.59, "chosen_on": "validation",
                        "validation": {"sensitivity": 0.86, "specificity": 0.8,
                                       "youden_j": 0.66}, "note": ""},
    "calibration": {"before": {"ece": 0.27, "brier": 0.2}, "after": {"ece": 0.04, "brier": 0.11}},
}


def test_the_terminal_states_the_operating_point_and_calibration_before_after() -> None:
    # Execute
    with console.capture() as cap:
        print_inference(SECTION)
        print_report({"rounds": [{"round": 1, "metrics": {"auc-pooled": 0.91}},
                                 {"round": 2, "metrics": {"auc-pooled": 0.9}}],
                      "model_selection": {"final_round": 1, "selection": "best validation AUC"},
                      "status": "completed"})
    text = " ".join(cap.get().split())
    # Assert
    assert "Operating point: calibrated probability ≥ 0.3127 (model score ≥ 0.0812)" in text
    assert "target sensitivity 0.85, chosen on validation" in text
    assert "sensitivity 0.860, specificity 0.800, J 0.660" in text
    assert "platt scaling (T = 1.700" in text
    assert "0.040 (uncalibrated 0.270)" in text and "0.110 (uncalibrated 0.200)" in text
    assert "1 ◀ final" in text and "0.910" in text
    assert "Final model: round 1 (best validation AUC)" in text


def test_a_recalibration_fit_that_failed_is_stated_in_the_terminal_and_the_report(
        tmp_path: Path) -> None:
    from server.report_sections import calibration_section_html

    bins = {"mean_score": [0.2, 0.3], "observed": [0.1, 0.6], "count": [40, 30],
            "bin_lower": [0.0, 0.25], "bin_upper": [0.25, 0.5], "ece": 0.155, "brier": 0.23}
    failed = {**SECTION, "calibration": {
        **bins, "before": bins, "after": bins,
        "fit": {"status": "failed", "reason": "Newton-Raphson did not converge"},
        "map": {"method": "none", "intercept": 0.0, "slope": 1.0, "temperature": 1.0}}}
    with console.capture() as cap:
        print_inference(failed)
    text = " ".join(cap.get().split())
    assert "0.155 (not recalibrated: the fit failed, see the report)" in text
    assert "uncalibrated" not in text
    html = calibration_section_html(failed["calibration"], lambda fig, alt: "")
    assert "Recalibration was not fitted (Newton-Raphson did not converge)" in html


# --- end to end: a small simulated federation through the CLI --------------------------------


@pytest.mark.slow
def test_run_reports_the_operating_point_and_test_metrics_at_it(tmp_path: Path) -> None:
    from client.app import _load, heldout_split
    from client.dicom.synth import synthesize_federation
    from client.training import evaluate
    from common.config import NodeConfig, TrainPlan
    from common.models import build_model
    from common.stats.calibration import ScoreCalibration

    # Prepare
    data = tmp_path / "data"
    synthesize_federation(data, n_sites=3, patients_per_site=120, seed=3)
    out = tmp_path / "run"
    # Execute
    result = CliRunner().invoke(app, [
        "federation", "run", "--data-root", str(data), "--rounds", "2", "--min-nodes", "3",
        "--target-sensitivity", "0.8", "--out", str(out), "--ledger-dir", str(tmp_path / "l"),
        "--min-release-count", "1"])
    # Assert: the report and the screen name the operating point, chosen on validation ...
    assert result.exit_code == 0, result.output[-3000:]
    doc = json.loads((out / "report.json").read_text())
    inf, op = doc["inference"], doc["inference"]["operating_point"]
    screen = " ".join(result.output.split())  # rich wraps lines at the terminal's width
    assert "Operating point:" in screen and "target sensitivity 0.8" in screen
    assert op["method"] == "target-sensitivity" and op["chosen_on"] == "validation"
    assert op["validation"]["sensitivity"] >= 0.8
    assert inf["threshold"] == op["calibrated_threshold"]
    assert {"before", "after", "map"} <= set(inf["calibration"])
    sel = doc["model_selection"]
    assert sel["selection"] == "best validation AUC" and sel["final_round"] in (1, 2)
    final = torch.load(out / "checkpoints" / "final.pt", weights_only=True)
    chosen = torch.load(out / "checkpoints" / f"round-{sel['final_round']}.pt", weights_only=True)
    assert all(torch.equal(final[key], chosen[key]) for key in final)
    # ... and the test confusion counts are those of the final model's calibrated test scores
    # at that threshold, computed here directly at every site.
    plan = TrainPlan.from_record(doc["config"])
    model = build_model(plan.model, in_channels=1, num_classes=2, image_size=plan.image_size)
    model.load_state_dict(final)
    cal = ScoreCalibration(op["calibration"], op["intercept"], op["slope"])
    tp = fp = tn = fn = 0
    for site in sorted(data.glob("site-*")):
        node = NodeConfig(data_dir=site, site_name=site.name, device="cpu")
        part = heldout_split(node, plan, _load(node, plan), "test")
        res = evaluate(model, part.images, part.labels, patient_index=part.patient_index,
                       device="cpu")
        pred = cal.apply(res.scores) >= op["calibrated_threshold"]
        y = res.labels.astype(bool)
        tp += int(np.sum(pred & y))
        fp += int(np.sum(pred & ~y))
        tn += int(np.sum(~pred & ~y))
        fn += int(np.sum(~pred & y))
    assert inf["confusion"] == {"tp": tp, "fp": fp, "tn": tn, "fn": fn}
    assert inf["metrics"]["sensitivity"]["value"] == pytest.approx(tp / (tp + fn))


def test_an_accuracy_at_half_far_below_the_auc_is_explained_in_the_terminal_and_the_report() -> None:
    from server.report_sections import training_section

    def doc(accuracy: float) -> dict[str, object]:
        return {"config": {"task": "binary"}, "status": "completed",
                "rounds": [{"round": 1, "metrics": {"auc-pooled": 0.97, "accuracy": accuracy,
                                                      "loss": 0.9, "train-loss": 1.1}}]}

    explained = "accuracy at 0.5 thresholds the model's raw score"
    for accuracy, shown in ((0.545, True), (0.9, False)):
        with console.capture() as cap:
            print_report(doc(accuracy))
        assert (explained in " ".join(cap.get().split())) is shown
        page = training_section(doc(accuracy), lambda fig, alt: "")
        assert ("Accuracy at 0.5 thresholds the model&#x27;s raw score" in page) is shown
