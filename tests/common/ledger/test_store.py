"""Ledger storage: append/read, the node key, torn tails after SIGKILL, concurrent writers."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.ledger import Ledger, LedgerError, verify_ledger
from common.ledger.entry import GENESIS
from tests.common.ledger.conftest import FP_A, FP_B, entry

REPO = Path(__file__).resolve().parents[3]


def test_appended_entries_read_back_in_order_and_chain(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(4)
    read = ledger.read()
    assert read.torn is None
    assert [r.index for r in read.records] == [0, 1, 2, 3]
    assert read.records[0].prev == GENESIS
    for before, after in zip(read.records, read.records[1:]):
        assert after.prev == before.hash
    assert [r.entry.fingerprint for r in read.records] == [FP_A, FP_B, FP_A, FP_B]
    assert all(r.entry.time.endswith("+00:00") for r in read.records)  # filled, UTC
    assert ledger.path.read_bytes().count(b"\n") == 4


def test_key_is_made_owner_only_once_and_reused(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger-dir" / "ledger.jsonl")
    ledger.append(entry())
    key = tmp_path / "ledger-dir" / "node-key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600
    pem = key.read_bytes()
    again = Ledger(ledger.path)
    again.append(entry(round=2))
    assert key.read_bytes() == pem  # never overwritten
    assert (tmp_path / "ledger-dir" / "node-key.pub").read_bytes() == again.public_key_pem
    kids = {r.kid for r in again.read().records}
    assert len(kids) == 1


def test_a_missing_ledger_reads_as_empty(tmp_path: Path) -> None:
    read = Ledger(tmp_path / "none.jsonl").read()
    assert read.records == () and read.torn is None
    assert not (tmp_path / "node-key.pem").exists()  # reading makes no key


def test_a_damaged_middle_line_makes_read_raise(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(3)
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    lines[1] = b"{not json\n"
    ledger.path.write_bytes(b"".join(lines))
    with pytest.raises(LedgerError, match="line 2"):
        ledger.read()


def _spawn(ledger: Path, mode: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.common.ledger._writer", str(ledger), mode],
        cwd=REPO, env=env, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_writer_killed_mid_entry_leaves_earlier_entries_and_reports_the_torn_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "node" / "ledger.jsonl"
    proc = _spawn(path, "partial")
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    before = path.read_bytes()

    read = Ledger(path).read()
    assert len(read.records) == 3
    assert read.torn is not None and read.torn.index == 3 and read.torn.line == 4

    report = verify_ledger(path)
    assert [(p.index, p.line) for p in report.problems] == [(3, 4)]
    assert "torn" in report.problems[0].reason
    assert not report.ok
    assert report.datasets[0].entries == 3  # earlier entries verified and counted

    with pytest.raises(LedgerError, match="torn") as err:
        Ledger(path).append(entry(round=9))
    assert "vesalius audit verify" in str(err.value)
    assert path.read_bytes() == before  # never dropped, repaired or extended


@pytest.mark.slow
def test_writer_killed_at_a_random_moment_never_corrupts_earlier_entries(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    proc = _spawn(path, "loop")
    time.sleep(random.uniform(0.3, 1.0))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    report = verify_ledger(path)
    intact = Ledger(path).read().records
    assert len(intact) >= 1
    # Either every entry is intact, or the only problem is the torn last one.
    assert all(p.index == len(intact) and "torn" in p.reason for p in report.problems)


def _append_many(path: str, tag: str, n: int) -> None:
    ledger = Ledger(Path(path))
    for i in range(n):
        ledger.append(entry(run_id=tag, round=i))


def test_two_processes_appending_at_once_do_not_interleave(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    Ledger(path).append(entry(run_id="first"))  # make the key before the race
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(path), tag, 15)) for tag in "xy"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    report = verify_ledger(path)
    assert report.ok, [p.describe() for p in report.problems]
    assert report.records == 31


def test_append_refuses_after_a_broken_chain_or_a_foreign_key(
    make_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    ledger = make_ledger(3)
    original = ledger.path.read_bytes()
    ledger.path.write_bytes(original.replace(b'"steps":20', b'"steps":2', 1))
    with pytest.raises(LedgerError, match=r"entry 0 \(line 1\).*modified"):
        ledger.append(entry(round=7))
    # a chain built with another key is refused too
    ledger.path.write_bytes(original)
    stranger = Ledger(ledger.path, key_path=tmp_path / "elsewhere" / "node-key.pem")
    with pytest.raises(LedgerError, match="not this node's key"):
        stranger.append(entry(round=7))
    assert ledger.path.read_bytes() == original
    ledger.append(entry(round=7))  # the rightful node still appends
    assert verify_ledger(ledger.path).ok
