"""``vesalius node``: what a hospital's IT runs (check the data, start the SuperNode).

Wiring only: the commands live in :mod:`cli.node_check`, :mod:`cli.node_start` and
:mod:`cli.node_keys` (and :mod:`cli.node_attention`).
"""

from __future__ import annotations

import typer

from cli.node_attention import attention
from cli.node_check import check
from cli.node_keys import keys
from cli.node_start import start

node_app = typer.Typer(help="Run and inspect a hospital node.", no_args_is_help=True)
node_app.command("check")(check)
node_app.command("start")(start)
node_app.command("keys")(keys)
node_app.command("attention")(attention)
