"""Every command with bad arguments: refused before anything starts, in one short message.

Requirements per case: exit code != 0; no exception escapes (a traceback in the real CLI); no
"Traceback", no frame lines, no local-variable dump; a short message (at most 25 lines). No
bad argument may reach the start of a simulation, a cross-validation, a SuperNode (``execve``
or a subprocess) or the writing of demo data: those entry points are replaced by sentinels
that abort the case and report it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.hostile._mutate import labels_csv, write_files
from tests.hostile._observe import invoke, outputs
from tests.hostile.conftest import Bases

MAX_LINES = 25


class Started(BaseException):
    """Raised by a sentinel: something started that a bad argument should have prevented."""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, bases: Bases) -> Path:
    """A folder with a usable labelled site (``site-1``, ``site-2``), a file and a junk ledger."""
    root = tmp_path_factory.mktemp("sweep")
    for site in ("site-1", "site-2"):
        folder = root / "data" / site
        write_files(folder, [bases["CT_small.dcm"][1], bases["MR_small.dcm"][1]])
        rows = [bases["CT_small.dcm"][0], bases["MR_small.dcm"][0]]
        (folder / "labels.csv").write_text(labels_csv(rows), encoding="utf-8")
    (root / "a-file.txt").write_text("not a folder")
    (root / "empty").mkdir()
    (root / "junk.jsonl").write_bytes(bytes(range(256)) * 4)
    (root / "half.jsonl").write_text('{"index": 0, "kind": "spend"\n{"index": 1}\n')
    return root


#: Cases whose error can only show while writing (the synthesis itself runs, for real).
WRITE_ERRORS = {"synth out under a file", "demo out under a file"}


def _sentinels(monkeypatch: pytest.MonkeyPatch, *, processes: bool, synthesis: bool) -> None:
    def started(what: str):  # type: ignore[no-untyped-def]
        def fake(*args: object, **kwargs: object) -> None:
            raise Started(what)
        return fake

    import client.dicom.synth
    import server.cv
    import server.simulation

    monkeypatch.setattr(server.simulation, "run_simulation", started("a simulation"))
    monkeypatch.setattr(server.cv, "simulate_cross_validation", started("a cross-validation"))
    monkeypatch.setattr(os, "execve", started("the SuperNode (execve)"))
    if synthesis:
        monkeypatch.setattr(client.dicom.synth, "synthesize_federation",
                            started("writing synthetic data"))
    if processes:
        monkeypatch.setattr(subprocess, "Popen", started("a subprocess (flwr / SuperNode)"))


def _cases(r: Path) -> list[tuple[str, list[str]]]:
    d, site = str(r / "data"), str(r / "data" / "site-1")
    missing, afile, empty = str(r / "nope"), str(r / "a-file.txt"), str(r / "empty")
    run = ["federation", "run", "--data-root", d, "--rounds", "1"]
    cv = ["federation", "cv", "--data-root", d, "--rounds", "1", "--folds", "2"]
    start = ["node", "start", "--data", site, "--insecure", "--superlink", "127.0.0.1:9"]
    power = ["stats", "power", "auc", "--auc", "0.8", "--half-width", "0.05"]
    return [
        ("synth sites -1", ["synth", "--out", str(r / "s1"), "--sites", "-1"]),
        ("synth patients 0", ["synth", "--out", str(r / "s2"), "--patients", "0"]),
        ("synth sites abc", ["synth", "--out", str(r / "s3"), "--sites", "abc"]),
        ("synth out under a file", ["synth", "--out", afile + "/x", "--sites", "1", "--patients", "4"]),
        ("synth out empty", ["synth", "--out", ""]),
        ("synth unknown option", ["synth", "--out", str(r / "s4"), "--nope"]),
        ("demo sites 1", ["demo", "--out", str(r / "d1"), "--sites", "1"]),
        ("demo epsilon -1", ["demo", "--out", str(r / "d2"), "--epsilon", "-1"]),
        ("demo epsilon nan", ["demo", "--out", str(r / "d3"), "--epsilon", "nan"]),
        ("demo rounds 0", ["demo", "--out", str(r / "d4"), "--rounds", "0"]),
        ("demo out under a file", ["demo", "--out", afile + "/x"]),
        ("node check missing", ["node", "check", "--data", missing]),
        ("node check empty string", ["node", "check", "--data", ""]),
        ("node check a file", ["node", "check", "--data", afile]),
        ("node check format xml", ["node", "check", "--data", site, "--format", "xml"]),
        ("node check unknown option", ["node", "check", "--data", site, "--nope"]),
        ("node check no data", ["node", "check"]),
        ("node start missing data", ["node", "start", "--data", missing, "--insecure"]),
        ("node start empty folder", ["node", "start", "--data", empty, "--insecure"]),
        ("node start no tls", ["node", "start", "--data", site]),
        ("node start epsilon-cap -1", [*start, "--epsilon-cap", "-1"]),
        ("node start epsilon-cap nan", [*start, "--epsilon-cap", "nan"]),
        ("node start epsilon-cap 0", [*start, "--epsilon-cap", "0"]),
        ("node start port -1", [*start, "--port", "-1"]),
        ("node start port 70000", [*start, "--port", "70000"]),
        ("node start superlink junk", ["node", "start", "--data", site, "--insecure",
                                       "--superlink", "not an address"]),
        ("node start superlink empty", ["node", "start", "--data", site, "--insecure",
                                        "--superlink", ""]),
        ("node start min-release -3", [*start, "--min-release-count", "-3"]),
        ("node start stats noise -1", [*start, "--stats-noise-multiplier", "-1"]),
        ("node start missing root cert", ["node", "start", "--data", site,
                                          "--root-certificates", missing + ".pem"]),
        ("node start missing tabular", [*start, "--tabular", missing + ".csv"]),
        ("node start max-attempts -1", [*start, "--max-attempts", "-1"]),
        ("node start unknown option", [*start, "--nope"]),
        ("run rounds 0", [*run[:-2], "--rounds", "0"]),
        ("run epsilon -1", [*run, "--epsilon", "-1"]),
        ("run epsilon nan", [*run, "--epsilon", "nan"]),
        ("run batch 0", [*run, "--batch-size", "0"]),
        ("run lr -1", [*run, "--lr", "-1"]),
        ("run model nope", [*run, "--model", "nope"]),
        ("run model unet", [*run, "--model", "unet"]),
        ("run model cnn3d on 2-D images", [*run, "--model", "cnn3d", "--samples", "image-2d"]),
        ("run image-size 0", [*run, "--image-size", "0"]),
        ("run image-size -5", [*run, "--image-size", "-5"]),
        ("run on-refusal maybe", [*run, "--on-refusal", "maybe"]),
        ("run format xml", [*run, "--format", "xml"]),
        ("run data-root missing", ["federation", "run", "--data-root", missing]),
        ("run data-root empty", ["federation", "run", "--data-root", empty]),
        ("run data-root a file", ["federation", "run", "--data-root", afile]),
        ("run noise -1", [*run, "--noise-multiplier", "-1"]),
        ("run max-grad-norm 0", [*run, "--max-grad-norm", "0"]),
        ("run min-nodes 0", [*run, "--min-nodes", "0"]),
        ("run min-nodes 5 of 2 sites", [*run, "--min-nodes", "5"]),
        ("run min-release -1", [*run, "--min-release-count", "-1"]),
        ("run hospital-dp-noise -1", [*run, "--hospital-dp-noise", "-1"]),
        ("run model-phase bogus", [*run, "--model-phase", "bogus"]),
        ("run epsilon-cap -1", [*run, "--epsilon-cap", "-1"]),
        ("run no data root", ["federation", "run"]),
        ("run unknown option", [*run, "--nope"]),
        ("cv folds 1", [*cv[:-2], "--folds", "1"]),
        ("cv folds -2", [*cv[:-2], "--folds", "-2"]),
        ("cv folds and loso", [*cv, "--leave-one-site-out"]),
        ("cv no folds", cv[:-2]),
        ("cv folds 99 of 4 patients", [*cv[:-2], "--folds", "99"]),
        ("cv format xml", [*cv, "--format", "xml"]),
        ("cv model nope", [*cv, "--model", "nope"]),
        ("cv rounds 0", [*cv, "--rounds", "0"]),
        ("certs valid-days 0", ["federation", "certs", "--out", str(r / "c1"), "--valid-days", "0"]),
        ("certs out under a file", ["federation", "certs", "--out", afile + "/x"]),
        ("certs host empty", ["federation", "certs", "--out", str(r / "c2"), "--host", ""]),
        ("audit show missing", ["audit", "show", "--ledger", missing]),
        ("audit show folder", ["audit", "show", "--ledger", empty]),
        ("audit show junk", ["audit", "show", "--ledger", str(r / "junk.jsonl")]),
        ("audit show half json", ["audit", "show", "--ledger", str(r / "half.jsonl")]),
        ("audit show format xml", ["audit", "show", "--ledger", str(r / "junk.jsonl"),
                                   "--format", "xml"]),
        ("audit show cap -1", ["audit", "show", "--ledger", str(r / "junk.jsonl"), "--cap", "-1"]),
        ("audit verify junk", ["audit", "verify", "--ledger", str(r / "junk.jsonl")]),
        ("audit verify tolerance -1", ["audit", "verify", "--ledger", str(r / "junk.jsonl"),
                                       "--tolerance", "-1"]),
        ("audit verify missing key", ["audit", "verify", "--ledger", str(r / "junk.jsonl"),
                                      "--public-key", missing]),
        ("audit verify bad head", ["audit", "verify", "--ledger", str(r / "junk.jsonl"),
                                   "--expect-head", "zz"]),
        ("audit export junk", ["audit", "export", "--ledger", str(r / "junk.jsonl"),
                               "--out", str(r / "e.json")]),
        ("audit export missing key", ["audit", "export", "--ledger", str(r / "half.jsonl"),
                                      "--out", str(r / "e2.json"), "--key", missing]),
        ("models list format xml", ["models", "list", "--format", "xml"]),
        ("models list image-size 0", ["models", "list", "--image-size", "0"]),
        ("models list image-size abc", ["models", "list", "--image-size", "abc"]),
        ("power auc 2", ["stats", "power", "auc", "--auc", "2", "--half-width", "0.05"]),
        ("power auc nan", ["stats", "power", "auc", "--auc", "nan", "--half-width", "0.05"]),
        ("power half-width 0", ["stats", "power", "auc", "--auc", "0.8", "--half-width", "0"]),
        ("power prevalence 0", [*power, "--prevalence", "0"]),
        ("power alpha 1.5", [*power, "--alpha", "1.5"]),
        ("power format xml", [*power, "--format", "xml"]),
        ("power auc-diff equal", ["stats", "power", "auc-diff", "--auc1", "0.8", "--auc2", "0.8"]),
        ("power auc-diff r 2", ["stats", "power", "auc-diff", "--auc1", "0.8", "--auc2", "0.7",
                                "--r", "2"]),
        ("power mcnemar sum > 1", ["stats", "power", "mcnemar", "--p10", "0.5", "--p01", "0.6"]),
        ("power mcnemar negative", ["stats", "power", "mcnemar", "--p10", "-0.1", "--p01", "0.2"]),
        ("unknown command", ["nope"]),
        ("unknown sub-command", ["federation", "nope"]),
    ]


CASE_NAMES = [name for name, _ in _cases(Path("/"))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_arguments_are_refused_in_one_short_message(
        monkeypatch: pytest.MonkeyPatch, tiny: Path, name: str) -> None:
    # Prepare
    args = dict(_cases(tiny))[name]
    _sentinels(monkeypatch, processes=args[0] != "audit", synthesis=name not in WRITE_ERRORS)
    # Execute
    try:
        result = invoke(args)
    except Started as started:
        pytest.fail(f"vesalius {' '.join(args)}: refused only after {started} started "
                    "(it must be refused before)")
    # Assert
    text = outputs(result)
    exc = result.exception
    assert exc is None or isinstance(exc, SystemExit), (
        f"vesalius {' '.join(args)}: unhandled {type(exc).__name__}: {exc!s:.300}\n{text[:800]}")
    assert result.exit_code != 0, f"vesalius {' '.join(args)} exited 0:\n{text[:800]}"
    for marker in ("Traceback", 'File "', "locals", "─ locals ─"):
        assert marker not in text, f"vesalius {' '.join(args)}: {marker!r} printed:\n{text[:1500]}"
    lines = [line for line in text.splitlines() if line.strip()]
    assert 1 <= len(lines) <= MAX_LINES, (
        f"vesalius {' '.join(args)}: {len(lines)} lines printed:\n{text[:1500]}")


def _real(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("vesalius")
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


@pytest.mark.slow
def test_real_process_node_check_on_a_missing_folder_prints_one_sentence(tiny: Path) -> None:
    # Execute
    proc = _real(["node", "check", "--data", str(tiny / "nope")], timeout=120)
    # Assert
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "Traceback" not in text, text
    assert len([line for line in text.splitlines() if line.strip()]) <= MAX_LINES, text


@pytest.mark.slow
def test_real_node_start_gives_up_on_an_address_nobody_listens_on(tiny: Path) -> None:
    # Prepare: port 9 (discard) on loopback: nothing listens there in the test environment
    args = ["node", "start", "--data", str(tiny / "data" / "site-1"), "--insecure",
            "--superlink", "127.0.0.1:9", "--max-attempts", "1",
            "--ledger-dir", str(tiny / "ledger")]
    # Execute
    start = time.monotonic()
    proc = _real(args, timeout=90)
    elapsed = time.monotonic() - start
    # Assert: a connection problem (exit 8), one short message, no traceback, no data path
    text = proc.stdout + proc.stderr
    assert proc.returncode == 8, f"exit {proc.returncode} after {elapsed:.0f} s:\n{text[-1500:]}"
    assert "Traceback" not in text, text[-1500:]
    assert str(tiny / "data" / "site-1") not in text, text[-1500:]
