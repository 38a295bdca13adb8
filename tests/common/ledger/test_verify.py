"""verify_ledger: one changed byte anywhere is found and the entry named; keys; summaries."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.ledger import (
    Ledger,
    LedgerError,
    Mechanism,
    export_summary,
    verify_ledger,
    verify_summary,
)
from tests.common.ledger.conftest import FP_A, FP_B

FAST = Mechanism("gaussian", noise_multiplier=5.0, steps=1)  # cheap to re-account


def _other_char(byte: int) -> int:
    """A different byte of the same class (digit -> digit, letter -> letter), else 'x'."""
    ch = chr(byte)
    if ch.isdigit():
        return ord(str((int(ch) + 1) % 10))
    if ch.isalpha():
        return ord("b" if ch != "b" else "c")
    return ord("x") if ch != "x" else ord("y")


def _flip(path: Path, offset: int, new: int) -> None:
    data = bytearray(path.read_bytes())
    assert data[offset] != new
    data[offset] = new
    path.write_bytes(bytes(data))


def _line_span(path: Path, index: int) -> tuple[int, bytes]:
    lines = path.read_bytes().splitlines(keepends=True)
    return sum(len(line) for line in lines[:index]), lines[index]


def test_an_untouched_ledger_verifies(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(4)
    report = verify_ledger(ledger.path)
    assert report.ok and report.problems == [] and report.records == 4
    assert {(d.fingerprint, d.entries) for d in report.datasets} == {(FP_A, 2), (FP_B, 2)}
    for d in report.datasets:
        assert d.epsilon_rdp == pytest.approx(d.epsilon_independent, rel=0.01)


@pytest.mark.parametrize(
    "target",
    ['"sig":"', '"hash":"', '"prev":"', '"noise_multiplier":', '"sample_rate":', '"steps":',
     '"fingerprint":"', '"delta":', '"kid":"', '"run_id":"', '"time":"', '"max_grad_norm":'],
)
def test_changing_one_byte_of_a_field_fails_and_names_the_entry(
    make_ledger: Callable[..., Ledger], target: str
) -> None:
    ledger = make_ledger(4)
    start, line = _line_span(ledger.path, 2)
    pos = start + line.index(target.encode()) + len(target) + 1  # inside the value
    _flip(ledger.path, pos, _other_char(ledger.path.read_bytes()[pos]))
    report = verify_ledger(ledger.path)
    assert not report.ok
    assert report.problems[0].index == 2 and report.problems[0].line == 3
    assert {p.index for p in report.problems} == {2}  # reported once, at the edited entry


def test_every_byte_of_an_entry_is_covered(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(3, FAST)
    original = ledger.path.read_bytes()
    start, line = _line_span(ledger.path, 1)
    for pos in range(start, start + len(line)):
        new = _other_char(original[pos]) if pos % 2 else (original[pos] + 1) % 256
        ledger.path.write_bytes(original)
        _flip(ledger.path, pos, new)
        report = verify_ledger(ledger.path)
        assert not report.ok, f"byte {pos - start} of entry 1 changed to {new} went unseen"
        assert report.problems[0].index == 1, (pos - start, report.problems[0])


def test_an_edit_that_keeps_the_json_values_is_still_found(
    make_ledger: Callable[..., Ledger],
) -> None:
    ledger = make_ledger(2)
    data = ledger.path.read_bytes()
    # 1e-05 and 1E-05 parse to the same float; the canonical-bytes check must still see it.
    assert data.count(b'"delta":1e-05') == 2
    ledger.path.write_bytes(data.replace(b'"delta":1e-05', b'"delta":1E-05', 1))
    report = verify_ledger(ledger.path)
    assert [p.index for p in report.problems] == [0]


def test_deleting_an_entry_is_found(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(4)
    lines = ledger.path.read_bytes().splitlines(keepends=True)
    ledger.path.write_bytes(b"".join(lines[:1] + lines[2:]))
    report = verify_ledger(ledger.path)
    assert not report.ok and report.problems[0].index == 1


def test_a_wrong_public_key_fails_every_entry(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(3)
    other = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    report = verify_ledger(ledger.path, public_key=other)
    assert [p.index for p in report.problems] == [0, 1, 2]
    assert "not by the given public key" in report.problems[0].reason
    assert verify_ledger(ledger.path, public_key=ledger.public_key_path).ok


def test_a_resigned_forgery_with_another_key_fails_against_the_node_key(
    make_ledger: Callable[..., Ledger], tmp_path: Path
) -> None:
    ledger = make_ledger(2)
    node_pub = ledger.public_key_pem
    forged = Ledger(tmp_path / "forged" / "ledger.jsonl")  # a new key, a consistent chain
    for record in ledger.read().records:
        forged.append(record.entry)
    assert verify_ledger(forged.path).ok  # self-consistent with its own key
    assert not verify_ledger(forged.path, public_key=node_pub).ok


def test_a_missing_ledger_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match="no ledger file"):
        verify_ledger(tmp_path / "absent.jsonl")


def test_export_is_signed_and_detects_edits(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(4)
    summary = export_summary(ledger.path, code_version="vesalius test", cap=8.0)
    assert summary["ledger"]["verified"] and summary["ledger"]["records"] == 4
    json.dumps(summary, allow_nan=False)  # strict JSON
    assert verify_summary(summary, ledger.public_key_pem)
    by_fp = {d["fingerprint"]: d for d in summary["datasets"]}
    spend = ledger.spend(FP_A)
    assert by_fp[FP_A]["epsilon_rdp"] == spend.epsilon_rdp
    assert by_fp[FP_A]["remaining"] == pytest.approx(8.0 - spend.epsilon_rdp)
    assert by_fp[FP_A]["runs"][0]["params"] == [{"local_epochs": 1, "max_grad_norm": 1.0,
                                                 "model": "cnn"}]
    summary["datasets"][0]["epsilon_rdp"] = 0.01
    assert not verify_summary(summary, ledger.public_key_pem)


def test_export_refuses_without_the_node_key(make_ledger: Callable[..., Ledger]) -> None:
    ledger = make_ledger(1)
    ledger.key_path.unlink()
    with pytest.raises(LedgerError, match="no node key"):
        export_summary(ledger.path, code_version="x")
