"""Container health checks (Dockerfile ``HEALTHCHECK``, compose ``healthcheck``).

``healthcheck.py node``
    Healthy while a SuperNode process runs in the container and the coordinator
    it was started with answers a TLS handshake verified against the CA it was given (both
    read from that process's own command line, so nothing is configured twice). This is the
    check `vesalius node start` makes before joining (``cli.supernode.probe``).
``healthcheck.py coordinator --port 9093``
    Healthy while a ``flower-superlink`` process runs and the port accepts connections.

Exit 0 when healthy, 1 otherwise, with one line saying why (``docker inspect`` shows it).
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path, PurePosixPath


def processes(proc: Path = Path("/proc")) -> list[list[str]]:
    """The command lines of the processes visible under ``proc`` (unreadable ones skipped)."""
    found = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            found.append([part.decode(errors="replace") for part in raw.rstrip(b"\0").split(b"\0")])
    return found


def find_program(program: str, cmdlines: Sequence[Sequence[str]]) -> list[str] | None:
    """The first command line that runs ``program``, directly or through an interpreter (a
    console script shows as ``python /path/flower-supernode ...``)."""
    for argv in cmdlines:
        for arg in argv[:2]:
            if PurePosixPath(arg).name == program:
                return list(argv)
    return None


def find_supernode(cmdlines: Sequence[Sequence[str]]) -> list[str] | None:
    """The SuperNode's command line: Flower's ``flower-supernode``, or a Python module named
    ``...supernode`` run with ``-m`` (the node's warm-worker SuperNode,
    ``python -m client.warm_worker.supernode``); both take ``--superlink`` and
    ``--root-certificates``."""
    found = find_program("flower-supernode", cmdlines)
    if found is not None:
        return found
    for argv in cmdlines:
        if "-m" in argv[:3]:
            i = list(argv).index("-m")
            if i + 1 < len(argv) and argv[i + 1].rsplit(".", 1)[-1] == "supernode":
                return list(argv)
    return None


def option(argv: Sequence[str], name: str) -> str | None:
    """The value of ``--name VALUE`` or ``--name=VALUE`` in ``argv``, else None."""
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg[len(name) + 1:]
    return None


def check_node(cmdlines: Sequence[Sequence[str]]) -> str | None:
    """None when the SuperNode runs and its coordinator answers; else why not."""
    argv = find_supernode(cmdlines)
    if argv is None:
        return "no SuperNode process (still checking the data or waiting for the coordinator?)"
    superlink = option(argv, "--superlink")
    if superlink is None:
        return "the SuperNode process has no --superlink"
    ca = option(argv, "--root-certificates")
    from cli.supernode import parse_address, probe

    host, port = parse_address(superlink)
    problem = probe(host, port, ca_file=Path(ca) if ca else None, timeout=5.0)
    return None if problem is None else problem.sentence(superlink)


def check_coordinator(cmdlines: Sequence[Sequence[str]], port: int) -> str | None:
    """None when flower-superlink runs and 127.0.0.1:``port`` accepts a connection."""
    if find_program("flower-superlink", cmdlines) is None:
        return "no flower-superlink process"
    try:
        socket.create_connection(("127.0.0.1", port), timeout=3.0).close()
    except OSError as exc:
        return f"port {port} does not accept connections: {exc.strerror or exc}"
    return None


def main(args: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("role", choices=["node", "coordinator"])
    parser.add_argument("--port", type=int, default=9093, help="coordinator: its port")
    parser.add_argument("--proc", type=Path, default=Path("/proc"), help=argparse.SUPPRESS)
    ns = parser.parse_args(args)
    cmdlines = processes(ns.proc)
    problem = (check_node(cmdlines) if ns.role == "node"
               else check_coordinator(cmdlines, ns.port))
    if problem is not None:
        print(f"unhealthy: {problem}")
        return 1
    print("healthy")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
