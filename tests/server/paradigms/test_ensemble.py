"""The ensemble paradigm's declaration and the coordinator's sub-run plans and refusals."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import pytest

from common.config import RunConfig, TrainPlan
from common.errors import ConfigError
from common.paradigms import canonical_options, get_paradigm, parse_option_pairs
from server.paradigms.ensemble import member_config, run_ensemble
from tests.flower_helpers import DirectGrid


def _config(**options: object) -> RunConfig:
    plan = TrainPlan(target_epsilon=6.0, seed=5, run_id="r1", paradigm="ensemble",
                     paradigm_options=canonical_options(
                         parse_option_pairs(get_paradigm("ensemble"),
                                            [f"{k}={v}" for k, v in options.items()])))
    return RunConfig(plan=plan, out_dir="/tmp/nowhere-ensemble", min_nodes=3)


def test_options_are_typed_and_bad_ones_are_refused() -> None:
    paradigm = get_paradigm("ensemble")
    assert paradigm.defaults()["members"] == 3 and paradigm.cv and paradigm.fold
    with pytest.raises(ConfigError, match="members must be >= 2"):
        parse_option_pairs(paradigm, ["members=1"])
    with pytest.raises(ConfigError, match="method must be one of seeds, bagging"):
        parse_option_pairs(paradigm, ["method=boosting"])
    with pytest.raises(ConfigError, match="binary task"):
        paradigm.check(dataclasses.replace(TrainPlan(), task="regression"), {})


def test_each_member_is_a_supervised_sub_run_with_its_seed_run_id_folder_and_share_of_eps() -> None:
    config = _config(members=3)
    subs = [member_config(config, i, 3) for i in range(3)]
    assert [s.plan.seed for s in subs] == [5, 6, 7]
    assert [s.plan.run_id for s in subs] == ["r1-member-0", "r1-member-1", "r1-member-2"]
    assert [s.out_dir for s in subs] == [f"/tmp/nowhere-ensemble/member-{i}" for i in range(3)]
    assert all(s.plan.paradigm == "supervised" and s.plan.paradigm_options == "" for s in subs)
    assert sum(s.plan.target_epsilon for s in subs) == pytest.approx(6.0)


class _ThreeHospitals(DirectGrid):
    def get_node_ids(self) -> Iterable[int]:
        return [1, 2, 3]

    def send_and_receive(self, messages, *, timeout=None):  # type: ignore[no-untyped-def]
        raise AssertionError("nothing may be sent before the plan is checked")


def test_bagging_under_secure_aggregation_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigError, match="--secure-aggregation off"):
        run_ensemble(_ThreeHospitals(), _config(method="bagging"))


def test_a_stacker_under_secure_aggregation_is_refused_before_anything_is_sent() -> None:
    with pytest.raises(ConfigError, match="combine=average or weighted"):
        run_ensemble(_ThreeHospitals(), _config(combine="stacker"))


def test_the_stacker_takes_its_share_of_eps_and_the_members_the_rest() -> None:
    from server.paradigms.ensemble_stacker import stacker_plan

    config = _config(members=3, combine="stacker")
    subs = [member_config(config, i, 3, stacker_share=0.25) for i in range(3)]
    plan = stacker_plan(config, 3, 0.25, 4)
    assert plan.paradigm == "ensemble-stacker" and plan.run_id == "r1-stacker"
    assert plan.num_rounds == 4 and plan.paradigm_options == '{"members":3}'
    assert sum(s.plan.target_epsilon for s in subs) + plan.target_epsilon == pytest.approx(6.0)
    assert plan.target_epsilon == pytest.approx(1.5)


def test_resuming_an_ensemble_is_refused() -> None:
    config = dataclasses.replace(_config(), resume_from="/tmp/some-run")
    with pytest.raises(ConfigError, match="cannot be resumed"):
        run_ensemble(_ThreeHospitals(), config)
