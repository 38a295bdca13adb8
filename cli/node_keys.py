"""``vesalius node keys``: make this hospital's key pair for SuperNode authentication."""

from __future__ import annotations

from pathlib import Path

import typer

from cli.console import console
from client.node_keys import make_node_keys


def keys(
    out: Path = typer.Option(Path("node-keys"), "--out",
                             help="Folder for node-key (private, 0600) and node-key.pub."),
    site_name: str = typer.Option("site", "--site-name",
                                  help="A label written in the public key's comment."),
    force: bool = typer.Option(False, "--force",
                               help="Replace an existing key pair (the coordinator must register "
                               "the new public key)."),
) -> None:
    """Make this hospital's key pair: the coordinator registers the public key, and the node
    signs with the private one (`vesalius node start --auth-private-key`)."""
    made = make_node_keys(out, comment=f"vesalius-{site_name}", force=force)
    console.print(f"private key: {made.private_key} (owner-only; it never leaves this machine)",
                  highlight=False, soft_wrap=True)
    console.print(f"public key:  {made.public_key}  fingerprint {made.fingerprint}",
                  highlight=False, soft_wrap=True)
    console.print("next: send node-key.pub to the coordinator operator, who registers it "
                  f"(`vesalius coordinator register --site {site_name} --public-key "
                  "node-key.pub`); compare the fingerprint with them; "
                  f"then `vesalius node start ... --auth-private-key {made.private_key}`",
                  highlight=False, soft_wrap=True)
