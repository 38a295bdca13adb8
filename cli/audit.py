"""``vesalius audit``: what an auditor runs on a node's privacy ledger (show, verify, export)."""

from __future__ import annotations

import json
import math
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import typer

from cli.console import console, err_console, fmt, table
from common.privacy.display import budget_text, epsilon_text

audit_app = typer.Typer(help="Inspect, verify and export a node's privacy ledger.",
                        no_args_is_help=True)

_LEDGER = typer.Option(..., "--ledger", help="The node's ledger file (ledger.jsonl).")
_FORMAT = typer.Option("table", "--format", help="table or json.")


def _fail(message: str, code: int = 2) -> typer.Exit:
    err_console.print(f"[red]error:[/red] {message}")
    return typer.Exit(code)


def _check_format(output_format: str) -> None:
    if output_format not in ("table", "json"):
        raise _fail(f"--format must be 'table' or 'json', got {output_format!r}")


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise _fail(f"no ledger file at {path} (a node's ledger is <ledger-dir>/ledger.jsonl)")


def _spent(value: float | None) -> str:
    """An ε as the table shows it: rounded up, as everywhere (``inf`` and missing as they are)."""
    if value is None or not math.isfinite(value):
        return fmt(value)
    return epsilon_text(value, 3)


def _budget(value: float | None) -> str:
    """A remaining budget as the table shows it: rounded down, never overstated."""
    if value is None or not math.isfinite(value):
        return fmt(value)
    return budget_text(value, 3)


def _num(value: float | None) -> float | str | None:
    if value is None:
        return None
    return "inf" if math.isinf(value) else ("nan" if math.isnan(value) else value)


@audit_app.command("show")
def show(
    ledger: Path = _LEDGER,
    cap: float | None = typer.Option(None, "--cap", help="The node's epsilon cap (patient level)."),
    output_format: str = _FORMAT,
) -> None:
    """Per dataset: epsilon spent (RDP and PRV), delta, cap, remaining, entries and runs."""
    from common.ledger import Ledger, LedgerError

    _check_format(output_format)
    _require_file(ledger)
    store = Ledger(ledger)
    try:
        read = store.read()
        keys = dict.fromkeys((r.entry.fingerprint, r.entry.level) for r in read.records)
        spends = [store.spend(fp, level=level) for fp, level in keys]
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    rows: list[dict[str, Any]] = []
    for s in spends:
        remaining = (max(0.0, cap - s.epsilon_rdp)
                     if cap is not None and s.level == "patient" else None)
        rows.append({
            "fingerprint": s.fingerprint, "level": s.level,
            "epsilon_rdp": _num(s.epsilon_rdp), "epsilon_prv": _num(s.epsilon_prv),
            "delta": s.delta, "cap": cap if s.level == "patient" else None,
            "remaining": _num(remaining), "entries": s.entries, "runs": list(s.runs),
        })
    torn = read.torn.describe() if read.torn else None
    if output_format == "json":
        console.print_json(json.dumps({"ledger": str(ledger), "datasets": rows, "torn": torn}))
        return
    t = table(f"Privacy spent per dataset ({ledger})",
              ["dataset", "level", "eps RDP", "eps PRV", "delta", "cap", "remaining",
               "entries", "runs"])
    for row, s in zip(rows, spends):
        t.add_row(f"{s.fingerprint[:16]}…" if len(s.fingerprint) > 16 else s.fingerprint,
                  s.level, _spent(s.epsilon_rdp), _spent(s.epsilon_prv), fmt(s.delta, ".1e"),
                  fmt(row["cap"], "g"), _budget(row["remaining"]), str(s.entries),
                  str(len(s.runs)))
    console.print(t)
    console.print("unit of privacy: patient (patient level) or hospital (client-level DP); "
                  "'exact' rows count releases without DP (exact metrics and statistics: "
                  "epsilon infinite, never counted against the cap); each dataset is composed "
                  "at its smallest delta")
    if torn:
        err_console.print(f"[yellow]warning:[/yellow] {torn}; run `vesalius audit verify`")


@audit_app.command("verify")
def verify(
    ledger: Path = _LEDGER,
    public_key: Path | None = typer.Option(
        None, "--public-key", help="The node's public key (default: node-key.pub beside it)."
    ),
    tolerance: float = typer.Option(
        0.01, "--tolerance", help="Relative tolerance of the epsilon recomputation (0.01 = 1%)."
    ),
    expect_head: list[str] = typer.Option(
        [], "--expect-head",
        help="INDEX:HASH anchor recorded outside the node (a run report's ledger_head, an "
        "export's head); catches removed last entries or a replaced file. Repeatable.",
    ),
    output_format: str = _FORMAT,
) -> None:
    """Check chain, signatures and torn tail; recompute epsilon with dp_accounting.

    Exits 0 when the ledger verifies, 1 when a problem is found (each names its entry).
    """
    from common.ledger import LedgerError, verify_ledger

    _check_format(output_format)
    _require_file(ledger)
    if public_key is not None and not public_key.is_file():
        raise _fail(f"no public key file at {public_key}")
    if not (tolerance >= 0 and math.isfinite(tolerance)):
        raise _fail("--tolerance must be a finite number >= 0")
    try:
        report = verify_ledger(ledger, public_key=public_key, tolerance=tolerance,
                               expect_heads=expect_head)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    if output_format == "json":
        console.print_json(json.dumps(report.to_dict()))
    else:
        t = table(f"Ledger {ledger}: {report.records} entries", ["dataset", "level", "entries",
                  "delta", "eps Opacus RDP", "eps dp_accounting"])
        for d in report.datasets:
            t.add_row(f"{d.fingerprint[:16]}", d.level, str(d.entries), fmt(d.delta, ".1e"),
                      fmt(d.epsilon_rdp, ".6f"), fmt(d.epsilon_independent, ".6f"))
        console.print(t)
        for problem in report.problems:
            console.print(f"[red]FAIL[/red] {problem.describe()}")
        if report.ok:
            console.print(f"[green]OK[/green] chain, signatures (key {report.key_id}) and epsilon "
                          f"(tolerance {tolerance:g}) verified")
    if not report.ok:
        raise typer.Exit(1)


def code_version() -> str:
    """``vesalius <version>`` plus the git commit of the checkout, when there is one."""
    try:
        version = metadata.version("vesalius")
    except metadata.PackageNotFoundError:
        version = "unknown"
    text = f"vesalius {version}"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{text} (git {commit})" if commit else text


@audit_app.command("export")
def export(
    ledger: Path = _LEDGER,
    out: Path = typer.Option(..., "--out", help="Where to write the signed JSON summary."),
    cap: float | None = typer.Option(None, "--cap", help="The node's epsilon cap (patient level)."),
    key: Path | None = typer.Option(
        None, "--key", help="The node's private key (default: node-key.pem beside the ledger)."
    ),
) -> None:
    """Write a signed JSON summary for a review board (datasets, runs, parameters, epsilon)."""
    from common.ledger import LedgerError, export_summary

    _require_file(ledger)
    try:
        summary = export_summary(ledger, code_version=code_version(), cap=cap, key_path=key)
    except LedgerError as exc:
        raise _fail(str(exc)) from None
    try:
        out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    except OSError as exc:
        raise _fail(f"cannot write {out}: {exc}") from None
    verified = summary["ledger"]["verified"]
    console.print(f"wrote {out}: {len(summary['datasets'])} dataset(s), signed by key "
                  f"{summary['key_id']}; ledger verified: {verified}")
    if not verified:
        err_console.print("[yellow]warning:[/yellow] the ledger did not verify; the summary "
                          "lists the problems")
        raise typer.Exit(1)
