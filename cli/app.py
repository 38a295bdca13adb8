"""The ``vesalius`` command: thin wiring of the sub-commands."""

from __future__ import annotations

import os

import typer

from cli.audit import audit_app
from cli.coordinator import coordinator_app
from cli.demo import demo
from cli.errors import SafeGroup
from cli.federation import federation_app
from cli.import_data import import_data
from cli.models import models_app
from cli.node import node_app
from cli.stats import stats_app
from cli.synth import synth

app = typer.Typer(
    name="vesalius",
    help="Federated, privacy-preserving training for medical images.",
    no_args_is_help=True,
    add_completion=False,
    cls=SafeGroup,  # every error ends as one sentence and an exit code (cli/errors.py)
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,  # never: a frame's locals can hold patient data
)
app.command("synth")(synth)
app.command("demo")(demo)
app.command("import")(import_data)
app.add_typer(node_app, name="node")
app.add_typer(federation_app, name="federation")
app.add_typer(coordinator_app, name="coordinator")
app.add_typer(audit_app, name="audit")
app.add_typer(models_app, name="models")
app.add_typer(stats_app, name="stats")


def main() -> None:
    """Console-script entry point."""
    for var, value in (
        ("FLWR_TELEMETRY_ENABLED", "0"),
        ("FLWR_DISABLE_UPDATE_CHECK", "1"),
        ("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1"),
    ):
        os.environ.setdefault(var, value)
    app()


if __name__ == "__main__":
    main()
