"""``vesalius models``: inspect the model zoo (registry of DP-trainable architectures)."""

from __future__ import annotations

import json
from typing import Any

import click
import typer

from cli.console import console, table

models_app = typer.Typer(help="Inspect the model zoo.", no_args_is_help=True)


def _describe(image_size: int) -> list[dict[str, Any]]:
    """One row per registered model; parameters counted on a 1-channel, 2-class build."""
    from common.errors import ConfigError
    from common.models import build_model, count_parameters, list_models
    from common.tasks import sample_kinds, tasks_of

    rows: list[dict[str, Any]] = []
    for spec in list_models():
        dims = 2 if 2 in spec.spatial_dims else spec.spatial_dims[0]
        try:
            params: int | None = count_parameters(
                build_model(spec.name, image_size=image_size, spatial_dims=dims)
            )
        except ConfigError:
            params = None  # the model does not accept this image size
        rows.append(
            {
                "name": spec.name,
                "family": spec.family,
                "parameters": params,
                "dims": list(spec.spatial_dims),
                "tasks": tasks_of(spec.name),
                "samples": [kind.value for kind in sample_kinds(spec)],
                "heads": list(spec.tasks),
                "grad_sample_mode": spec.grad_sample_mode,
                "description": spec.description,
            }
        )
    return rows


@models_app.command("list")
def list_command(
    output_format: str = typer.Option("table", "--format", click_type=click.Choice(["table", "json"]),
                                      help="table or json."),
    image_size: int = typer.Option(
        32, "--image-size", min=4, help="Side length used to count parameters."
    ),
) -> None:
    """List registered models: name, family, parameters, spatial dims, the tasks each serves
    (common/tasks), DP mode.

    The JSON output adds each model's sample kinds, output heads and one-line description.
    """
    rows = _describe(image_size)
    if output_format == "json":
        console.print_json(json.dumps(rows))
        return
    t = table(
        f"Registered models (parameters at {image_size} px, 1 channel, 2 classes)",
        ["name", "family", "parameters", "dims", "tasks", "DP mode"],
    )
    for row in rows:
        t.add_row(
            row["name"],
            row["family"],
            "-" if row["parameters"] is None else f"{row['parameters']:,}",
            ",".join(f"{d}D" for d in row["dims"]),
            ", ".join(row["tasks"]),  # wraps at the spaces in a narrow terminal
            row["grad_sample_mode"],
        )
    console.print(t)
