"""`vesalius audit show|verify|export` on real ledgers (typer's CliRunner)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from common.ledger import Ledger, LedgerEntry, Mechanism, verify_summary

FP = "c" * 64
ROUND = Mechanism("subsampled-gaussian", noise_multiplier=1.2, sample_rate=0.05, steps=20)


@pytest.fixture
def ledger(tmp_path: Path) -> Ledger:
    store = Ledger(tmp_path / "node" / "ledger.jsonl")
    for rnd in range(1, 4):
        store.append(LedgerEntry(FP, "run-1", "train", ROUND, 1e-5, 120, round=rnd))
    store.append(LedgerEntry(FP, "run-1", "query:mean", Mechanism("gaussian", noise_multiplier=6.0),
                             1e-5, 120))
    return store


def _run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["audit", *args])
    return result.exit_code, result.output


def test_verify_passes_on_an_untouched_ledger(ledger: Ledger) -> None:
    code, out = _run("verify", "--ledger", str(ledger.path), "--format", "json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["ok"] and doc["records"] == 4 and doc["problems"] == []


@pytest.mark.parametrize("target", [b'"sig":"', b'"noise_multiplier":', b'"prev":"'])
def test_one_changed_byte_fails_verify_and_names_the_entry(ledger: Ledger, target: bytes) -> None:
    data = bytearray(ledger.path.read_bytes())
    lines = bytes(data).splitlines(keepends=True)
    start = sum(len(line) for line in lines[:2])
    pos = start + lines[2].index(target) + len(target) + 2
    data[pos] = ord("7") if data[pos] != ord("7") else ord("8")
    ledger.path.write_bytes(bytes(data))
    code, out = _run("verify", "--ledger", str(ledger.path))
    assert code == 1
    assert "entry 2 (line 3)" in out
    code, out = _run("verify", "--ledger", str(ledger.path), "--format", "json")
    assert code == 1 and json.loads(out)["problems"][0]["index"] == 2


def test_verify_with_a_wrong_public_key_fails(ledger: Ledger, tmp_path: Path) -> None:
    other = Ledger(tmp_path / "other" / "ledger.jsonl")
    pub = tmp_path / "other.pub"
    pub.write_bytes(other.public_key_pem)
    code, out = _run("verify", "--ledger", str(ledger.path), "--public-key", str(pub))
    assert code == 1 and "entry 0" in out


def test_show_reports_spend_cap_and_remaining(ledger: Ledger) -> None:
    code, out = _run("show", "--ledger", str(ledger.path), "--cap", "8", "--format", "json")
    assert code == 0, out
    (row,) = json.loads(out)["datasets"]
    spend = ledger.spend(FP)
    assert row["epsilon_rdp"] == pytest.approx(spend.epsilon_rdp)
    assert row["epsilon_prv"] == pytest.approx(spend.epsilon_prv)
    assert row["remaining"] == pytest.approx(8 - spend.epsilon_rdp)
    assert row["entries"] == 4 and row["runs"] == ["run-1"] and row["delta"] == 1e-5
    code, table_out = _run("show", "--ledger", str(ledger.path))
    assert code == 0 and "patient" in table_out


def test_export_writes_a_summary_the_node_key_verifies(ledger: Ledger, tmp_path: Path) -> None:
    out_file = tmp_path / "summary.json"
    code, out = _run("export", "--ledger", str(ledger.path), "--out", str(out_file), "--cap", "8")
    assert code == 0, out
    summary = json.loads(out_file.read_text())
    assert summary["code_version"].startswith("vesalius ")
    assert verify_summary(summary, ledger.public_key_path)


@pytest.mark.parametrize("command", ["show", "verify"])
def test_a_missing_ledger_is_a_clear_error_without_traceback(tmp_path: Path, command: str) -> None:
    code, out = _run(command, "--ledger", str(tmp_path / "absent.jsonl"))
    assert code == 2
    assert "no ledger file" in out and "Traceback" not in out


def test_a_torn_last_entry_fails_verify_and_show_warns(ledger: Ledger) -> None:
    data = ledger.path.read_bytes()
    ledger.path.write_bytes(data[:-40])  # cut inside the last line
    code, out = _run("verify", "--ledger", str(ledger.path))
    assert code == 1 and "entry 3 (line 4)" in out and "torn" in out
    code, out = _run("show", "--ledger", str(ledger.path), "--format", "json")
    assert code == 0
    doc = json.loads(out)
    assert doc["datasets"][0]["entries"] == 3 and "entry 3" in doc["torn"]


def test_show_rounds_the_spend_up_and_the_remaining_budget_down(ledger: Ledger) -> None:
    import math

    spend = ledger.spend(FP)
    cap = math.floor(spend.epsilon_rdp * 1000) / 1000 + 1.0005  # remaining x.xxx5: rounding differs
    code, out = _run("show", "--ledger", str(ledger.path), "--cap", str(cap))
    assert code == 0, out
    text = " ".join(out.split())
    assert f"{math.ceil(spend.epsilon_rdp * 1000) / 1000:.3f}" in text
    assert f"{math.floor((cap - spend.epsilon_rdp) * 1000) / 1000:.3f}" in text
