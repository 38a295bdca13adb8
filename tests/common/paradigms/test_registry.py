"""The paradigm registry: declarations, typed options, the plan's canonical text, the CLI list."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from common.config import TrainPlan
from common.errors import ConfigError
from common.paradigms import (
    Paradigm,
    ParadigmOption,
    canonical_options,
    get_paradigm,
    list_paradigms,
    parse_option_pairs,
    read_options,
)

DEMO = Paradigm(
    name="demo-test", summary="a paradigm of this test",
    options=(ParadigmOption("threshold", float, 0.9, "confidence", minimum=0.5, maximum=1.0),
             ParadigmOption("views", int, 2, "views per patient", minimum=1),
             ParadigmOption("pretext", str, "rotation", "pretext", choices=("rotation", "mask")),
             ParadigmOption("freeze", bool, False, "freeze the trunk")),
)


def test_supervised_is_the_default_and_listed_first() -> None:
    assert list_paradigms()[0].name == "supervised"
    assert TrainPlan().paradigm == "supervised"
    assert get_paradigm("supervised").workflow == ""


def test_unknown_paradigm_names_the_registered_ones() -> None:
    with pytest.raises(ConfigError, match="unknown paradigm 'nope'.*supervised"):
        get_paradigm("nope")
    with pytest.raises(ConfigError, match="unknown paradigm"):
        TrainPlan(paradigm="nope")


def test_option_pairs_are_typed_checked_and_defaulted() -> None:
    values = parse_option_pairs(DEMO, ["threshold=0.95", "freeze=yes"])
    assert values == {"threshold": 0.95, "views": 2, "pretext": "rotation", "freeze": True}
    for bad, message in (("threshold=0.2", ">= 0.5"), ("views=1.5", "integer"),
                         ("pretext=jigsaw", "one of rotation, mask"), ("freeze=maybe", "true/false"),
                         ("colour=red", "no option 'colour'.*threshold, views"),
                         ("threshold", "KEY=VALUE"), ("threshold=nan", "number")):
        with pytest.raises(ConfigError, match=message):
            parse_option_pairs(DEMO, [bad])
    with pytest.raises(ConfigError, match="twice"):
        parse_option_pairs(DEMO, ["views=2", "views=3"])


def test_canonical_text_round_trips_and_does_not_depend_on_order() -> None:
    a = canonical_options(parse_option_pairs(DEMO, ["views=3", "threshold=0.6"]))
    b = canonical_options(parse_option_pairs(DEMO, ["threshold=0.6", "views=3"]))
    assert a == b
    assert read_options(DEMO, a) == parse_option_pairs(DEMO, ["views=3", "threshold=0.6"])
    assert read_options(DEMO, "") == DEMO.defaults()
    with pytest.raises(ConfigError, match="JSON object"):
        read_options(DEMO, "[1, 2]")
    with pytest.raises(ConfigError, match=">= 1"):
        read_options(DEMO, json.dumps({"views": 0}))


def test_plan_carries_paradigm_and_options_on_the_wire() -> None:
    plan = TrainPlan(paradigm="supervised")
    record = plan.to_record()
    assert record["paradigm"] == "supervised" and record["paradigm-options"] == ""
    assert TrainPlan.from_record(record) == plan
    with pytest.raises(ConfigError, match="no option"):
        TrainPlan(paradigm="supervised", paradigm_options='{"x": 1}')


def test_cli_lists_paradigms_and_refuses_unknown_ones(tmp_path) -> None:
    runner = CliRunner()
    listed = runner.invoke(app, ["federation", "paradigms", "--format", "json"],
                           env={"COLUMNS": "300"})
    assert listed.exit_code == 0, listed.output
    names = [p["name"] for p in json.loads(listed.output)]
    assert names[0] == "supervised"
    refused = runner.invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                  "--paradigm", "nope"], env={"COLUMNS": "300"})
    assert refused.exit_code == 2
    assert "unknown paradigm 'nope'" in refused.output
    bad = runner.invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                              "-P", "colour=red"], env={"COLUMNS": "300"})
    assert bad.exit_code == 2 and "has no option 'colour'" in bad.output


def test_workflow_stages_are_sent_to_nodes_but_not_listed_or_chosen(tmp_path) -> None:
    stages = [p.name for p in list_paradigms(stages=True) if p.stage]
    assert "self-supervised-rounds" in stages and "semi-supervised-rounds" in stages
    assert not set(stages) & {p.name for p in list_paradigms()}
    assert TrainPlan(paradigm="semi-supervised-rounds").paradigm == "semi-supervised-rounds"
    refused = CliRunner().invoke(app, ["federation", "run", "--data-root", str(tmp_path),
                                       "--paradigm", "fine-tune-rounds"], env={"COLUMNS": "300"})
    assert refused.exit_code == 2 and "is a stage" in refused.output


def test_options_travel_through_flowers_run_config_parser() -> None:
    # A JSON text in --run-config: Flower's pattern ends a "..." value at the first quote
    from flwr.common.config import parse_config_args

    from cli.flower import toml_value

    values = {"labelled-fraction": 0.5, "pretrained": "/data/it's a \"model\" \\ here.pt"}
    text = canonical_options(values)
    assert "'" not in text
    parsed = parse_config_args([f"paradigm-options={toml_value(text)} augment=\"light\""])
    assert parsed == {"paradigm-options": text, "augment": "light"}
    assert json.loads(parsed["paradigm-options"]) == values
