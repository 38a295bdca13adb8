"""Typed configuration: parsing, defaults, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.config import NodeConfig, RunConfig, TrainPlan
from common.errors import ConfigError


def test_plan_round_trips_through_wire_keys() -> None:
    plan = TrainPlan(num_rounds=3, private=False, learning_rate=0.1, model="cnn")
    assert TrainPlan.from_record(plan.to_record()) == plan


def test_plan_parses_strings_and_rejects_bad_values() -> None:
    plan = TrainPlan.from_record({"num-server-rounds": "4", "private": "false"})
    assert plan.num_rounds == 4 and plan.private is False
    with pytest.raises(ConfigError, match="num-server-rounds"):
        TrainPlan.from_record({"num-server-rounds": "many"})
    with pytest.raises(ConfigError, match="target-epsilon"):
        TrainPlan(target_epsilon=0.0, noise_multiplier=0.0)
    with pytest.raises(ConfigError, match="max-grad-norm"):
        TrainPlan(max_grad_norm=0.0)


def test_run_config_defaults_and_fraction_validation() -> None:
    cfg = RunConfig.from_user_config({"num-server-rounds": 2, "out-dir": "x"})
    assert cfg.plan.num_rounds == 2 and cfg.out_dir == "x" and cfg.fraction_train == 1.0
    assert cfg.to_dict()["num-server-rounds"] == 2
    with pytest.raises(ConfigError, match="fraction-train"):
        RunConfig(fraction_train=0.0)


def test_node_config_requires_data_dir_with_safe_reason() -> None:
    with pytest.raises(ConfigError) as info:
        NodeConfig.from_user_config({})
    assert "data-dir" in info.value.safe_reason
    node = NodeConfig.from_user_config({"data-dir": "/srv/x", "epsilon-cap": 3, "allow-non-private": True})
    assert node.data_dir == Path("/srv/x") and node.epsilon_cap == 3.0 and node.allow_non_private
    with pytest.raises(ConfigError, match="epsilon-cap"):
        NodeConfig(data_dir=Path("."), epsilon_cap=0)


def test_plan_rejects_non_finite_privacy_values() -> None:
    for key in ("noise-multiplier", "max-grad-norm", "target-epsilon", "target-delta"):
        with pytest.raises(ConfigError, match=key):
            TrainPlan.from_record({key: float("nan")})
    with pytest.raises(ConfigError, match="max-grad-norm"):
        TrainPlan.from_record({"max-grad-norm": float("inf")})


def test_toml_values_round_trip_through_a_toml_parser() -> None:
    import tomllib

    from cli.flower import toml_value

    for value in ("/srv/it's here/dicom", 'quote"d', 3, 0.5, True):
        assert tomllib.loads(f"x = {toml_value(value)}")["x"] == value
