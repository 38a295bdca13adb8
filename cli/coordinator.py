"""``vesalius coordinator``: run the SuperLink and admit hospitals by their keys.

Wiring plus the registry commands; ``start`` lives in :mod:`cli.coordinator_start`, the state
folder in :mod:`server.coordinator_state`. Admission is Flower's own SuperNode authentication:
the SuperLink runs with ``--enable-supernode-auth``, a hospital's public key is registered with
``flwr supernode register`` (revoked with ``flwr supernode unregister``) through the Control
API, and ``nodes.json`` adds what Flower does not keep: which site a key belongs to.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import typer

from cli.console import console, table
from cli.coordinator_start import say, start, state_paths
from cli.flwr_control import FlwrFailure, flwr_json
from cli.options import OUTPUT_FORMATS
from common.errors import ConfigError
from server.coordinator_state import (
    NodeRecord,
    StatePaths,
    load_links,
    load_nodes,
    now_iso,
    read_public_key,
    save_nodes,
)

coordinator_app = typer.Typer(help="Run the coordinator and admit hospitals.",
                              no_args_is_help=True)
coordinator_app.command("start")(start)

_STATE_DIR = typer.Option(None, "--state-dir", help="Coordinator state folder (default "
                          "$VESALIUS_HOME/coordinator).")
_SITE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NEW_KEY = ("the hospital makes a new pair with `vesalius node keys --force` and sends the new "
            "node-key.pub")


def _site(value: str) -> str:
    if _SITE.fullmatch(value) is None:
        raise typer.BadParameter("a site name is 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
    return value


def _node_auth_on(paths: StatePaths) -> str:
    settings = load_links(paths)
    if not settings.node_auth:
        raise ConfigError("this coordinator admits any SuperNode (it was started with --insecure "
                          "or --no-node-auth), so registering has no effect: start it without "
                          "those options", safe_reason="node authentication is off")
    return settings.address


def _refuse_known_key(paths: StatePaths, site: str, fingerprint: str, force: bool) -> None:
    registry = load_nodes(paths)
    current = registry.active(site)
    if current is not None and not force:
        same = " with this key" if current.fingerprint == fingerprint else ""
        raise ConfigError(f"site {site} is already registered{same} (key {current.fingerprint}, "
                          f"node id {current.node_id}); give --force to replace its key",
                          safe_reason="site already registered")
    known = registry.by_fingerprint(fingerprint)
    if known is not None and known.active and known.site != site:
        raise ConfigError(f"this key is already registered as site {known.site}: every hospital "
                          "needs its own key pair", safe_reason="key already registered")
    if known is not None and not known.active:
        raise ConfigError(f"this key was revoked (site {known.site}, {known.revoked_at}) and "
                          f"Flower never admits a revoked key again: {_NEW_KEY}",
                          safe_reason="key revoked")


@coordinator_app.command("register")
def register(
    site: str = typer.Option(..., "--site", callback=_site, help="The hospital's site name."),
    public_key: Path = typer.Option(..., "--public-key",
                                    help="The hospital's node-key.pub (from `vesalius node keys`)."),
    state_dir: Path | None = _STATE_DIR,
    force: bool = typer.Option(False, "--force", help="Replace the key of a site already "
                               "registered (its old key is revoked)."),
) -> None:
    """Admit a hospital: register its public key with the SuperLink (Flower's SuperNode
    authentication) under a site name."""
    line, fingerprint = read_public_key(public_key)
    paths = state_paths(state_dir)
    address = _node_auth_on(paths)
    _refuse_known_key(paths, site, fingerprint, force)
    try:
        doc = flwr_json(["supernode", "register", str(public_key.expanduser().resolve())],
                        paths.flwr_home, address=address, options=["--name", site])
    except FlwrFailure as exc:
        if "already in use" in exc.reason.lower():
            raise ConfigError("the SuperLink already knows this key (registered or revoked "
                              f"outside this coordinator's records): {_NEW_KEY}",
                              safe_reason="key already known") from None
        raise
    registry = load_nodes(paths)
    previous = registry.active(site)
    registry.records.append(NodeRecord(site=site, fingerprint=fingerprint,
                                       node_id=str(doc["node-id"]), public_key=line,
                                       registered_at=now_iso()))
    save_nodes(paths, registry)  # recorded before anything else can fail
    if previous is not None:  # --force: the new key is in; revoke the old one
        _revoke(paths, previous)
    console.print(f"registered site {site}: node id {doc['node-id']}, key {fingerprint} (compare "
                  "it with the fingerprint `vesalius node keys` printed at the hospital)",
                  highlight=False, soft_wrap=True)
    console.print("the hospital joins with `vesalius node start --superlink <this host>:<port> "
                  "--root-certificates ca.crt --auth-private-key node-key ...`",
                  highlight=False, soft_wrap=True)


def _revoke(paths: StatePaths, record: NodeRecord) -> None:
    """Unregister ``record``'s node with the SuperLink and mark it revoked in ``nodes.json``."""
    address = load_links(paths).address
    try:
        flwr_json(["supernode", "unregister", record.node_id], paths.flwr_home, address=address)
    except FlwrFailure as exc:
        if "not found" not in exc.reason.lower():
            raise
        say(f"the SuperLink no longer knew node {record.node_id}; recorded as revoked")
    registry = load_nodes(paths)
    registry.records = [r.revoked() if r == record else r for r in registry.records]
    save_nodes(paths, registry)


@coordinator_app.command("unregister")
def unregister(
    site: str = typer.Option(..., "--site", callback=_site, help="The site to revoke."),
    state_dir: Path | None = _STATE_DIR,
) -> None:
    """Revoke a hospital: the SuperLink refuses its key from its next request on."""
    paths = state_paths(state_dir)
    record = load_nodes(paths).active(site)
    if record is None:
        raise ConfigError(f"no admitted site is named {site} (`vesalius coordinator status` "
                          "lists them)", safe_reason="unknown site")
    _revoke(paths, record)
    console.print(f"revoked site {site} (node id {record.node_id}, key {record.fingerprint}): "
                  "the SuperLink refuses it from its next request. A revoked key is never "
                  f"admitted again; to re-admit the hospital, {_NEW_KEY}, and register that.",
                  highlight=False, soft_wrap=True)


def node_rows(flower_nodes: list[dict[str, Any]], records: list[NodeRecord]
              ) -> list[dict[str, Any]]:
    """One row per node Flower knows, named by site from ``nodes.json`` where it can be."""
    by_id = {r.node_id: r for r in records}
    rows = []
    for node in flower_nodes:
        node_id = str(node.get("node-id", ""))
        record = by_id.get(node_id)
        status = str(node.get("status", ""))
        rows.append({
            "site": record.site if record else None,
            "fingerprint": record.fingerprint if record else None,
            "node_id": node_id,
            "status": status,
            "connected": status == "online",
            "registered_at": node.get("created-at"),
            "online_at": node.get("online-at"),
            "revoked_at": (record.revoked_at or None) if record else node.get("deleted-at"),
        })
    return rows


def run_rows(flower_runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fields of ``flwr ls --format json`` a coordinator operator reads."""
    keep = ("run-id", "fab-name", "status", "elapsed", "pending-at", "finished-at")
    return [{key.replace("-", "_"): run.get(key) for key in keep} for run in flower_runs]


@coordinator_app.command("status")
def status(
    state_dir: Path | None = _STATE_DIR,
    output_format: str = typer.Option("table", "--format",
                                      click_type=click.Choice(list(OUTPUT_FORMATS))),
) -> None:
    """List the registered hospitals (connected or not) and the runs of this coordinator."""
    paths = state_paths(state_dir)
    settings = load_links(paths)
    nodes = flwr_json(["supernode", "ls"], paths.flwr_home, address=settings.address)
    runs = flwr_json(["ls"], paths.flwr_home, address=settings.address)
    doc = {
        "superlink": {"address": settings.address, "tls": settings.tls,
                      "node_auth": settings.node_auth},
        "nodes": node_rows(list(nodes.get("nodes", [])), load_nodes(paths).records),
        "runs": run_rows(list(runs.get("runs", []))),
    }
    if output_format == "json":
        console.print_json(json.dumps(doc))
        return
    _print_status(doc)


def _print_status(doc: dict[str, Any]) -> None:
    link = doc["superlink"]
    console.print(f"SuperLink {link['address']}: TLS {'on' if link['tls'] else 'OFF'}, node "
                  f"authentication {'on' if link['node_auth'] else 'OFF'}", highlight=False)
    nodes = table("Hospitals", ["site", "key fingerprint", "node id", "status", "connected"])
    for row in doc["nodes"]:
        nodes.add_row(row["site"] or "(not registered here)", row["fingerprint"] or "-",
                      row["node_id"], row["status"], "yes" if row["connected"] else "no")
    console.print(nodes)
    strangers = [row["node_id"] for row in doc["nodes"]
                 if row["site"] is None and row["status"] != "unregistered"]
    if strangers:
        console.print(f"[yellow]{len(strangers)} node(s) were registered with Flower directly, "
                      "not by `vesalius coordinator register`: if nobody here added them, revoke "
                      "them with `flwr supernode unregister <node id> vesalius` (FLWR_HOME=<state "
                      "dir>/flwr-home) and restrict who reaches the SuperLink's port[/yellow]",
                      highlight=False, soft_wrap=True)
    runs = table("Runs", ["run id", "app", "status", "elapsed", "finished"])
    for run in doc["runs"]:
        runs.add_row(str(run["run_id"]), str(run["fab_name"]), str(run["status"]),
                     str(run["elapsed"]), str(run["finished_at"] or "-"))
    console.print(runs)
