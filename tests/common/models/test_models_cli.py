"""``vesalius models list``: table and JSON listing of the registry."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cli.app import app
from common.models import build_model, count_parameters, list_models
from common.tasks import tasks_of

REQUIRED = {
    "mlp", "cnn", "resnet", "densenet", "cnn3d", "lstm", "gru",
    "dc-elm", "dbn", "dbm", "autoencoder", "dsn", "unet",
}
"""Models the issue's acceptance criterion names."""


@pytest.fixture(scope="module")
def json_rows() -> list[dict[str, object]]:
    result = CliRunner().invoke(app, ["models", "list", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert isinstance(rows, list)
    return rows


def test_json_lists_every_registered_model_with_its_fields(
    json_rows: list[dict[str, object]],
) -> None:
    rows = json_rows
    assert [r["name"] for r in rows] == [s.name for s in list_models()]
    for row, spec in zip(rows, list_models(), strict=True):
        assert row["family"] == spec.family
        assert row["dims"] == list(spec.spatial_dims)
        assert row["heads"] == list(spec.tasks)
        assert row["tasks"] == tasks_of(spec.name) and row["tasks"]  # every model serves a task
        assert row["grad_sample_mode"] == spec.grad_sample_mode
    cnn = next(r for r in rows if r["name"] == "cnn")
    assert cnn["parameters"] == count_parameters(build_model("cnn", image_size=32)) == 14_274


def test_acceptance_models_are_all_listed(json_rows: list[dict[str, object]]) -> None:
    names = {r["name"] for r in json_rows}
    assert REQUIRED <= names, f"missing: {sorted(REQUIRED - names)}"


def test_table_shows_names_and_parameter_counts() -> None:
    result = CliRunner().invoke(app, ["models", "list"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "cnn3d" in result.output and "14,274" in result.output


def test_unknown_format_is_refused() -> None:
    result = CliRunner().invoke(app, ["models", "list", "--format", "xml"])
    assert result.exit_code != 0
