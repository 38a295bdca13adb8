"""One hostile case: a folder with a mutated file and two clean neighbours, checked end to end.

The folder (a fresh temporary directory with a distinctive name) holds ``f000.dcm`` (the
mutated file), ``f001.dcm`` and ``f002.dcm`` (clean, de-identified-looking, labelled) and a
valid ``labels.csv``. The case then

1. scans it with ``client.dicom.scan_data_dir`` (pixels decoded when supported): no exception;
2. checks that every file is classified, that both neighbours are used, and that every used
   file is indexed under the Patient ID planted in it;
3. runs ``vesalius node check`` in json and table modes: a clean exit 0 and the same counts;
4. searches the scan report, warnings, WARNING+ log records, the CLI's output and the real
   stdout/stderr for every planted value and for the folder's absolute path.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

from client.dicom.reasons import SkipCode, SkippedFile
from tests.hostile._mutate import Planted, labels_csv, write_files
from tests.hostile._observe import (
    assert_classified,
    assert_clean_exit,
    assert_no_leak,
    invoke,
    observe,
    outputs,
    report_json_without_paths,
    scan,
)

MUTATED = "f000.dcm"


@dataclass(frozen=True)
class Outcome:
    """What happened to the mutated file."""

    used: bool
    skip: SkippedFile | None
    patient_id: str | None


def neighbours(bases: dict[str, tuple[Planted, bytes]], base: str) -> list[tuple[Planted, bytes]]:
    """Two clean files from other bases than ``base`` (native ones)."""
    others = [n for n in ("CT_small.dcm", "MR_small.dcm", "rtdose_1frame.dcm") if n != base]
    return [bases[n] for n in others[:2]]


def run_case(
    capfd: pytest.CaptureFixture[str],
    what: str,
    mutated: bytes,
    planted: Planted,
    clean: list[tuple[Planted, bytes]],
    *,
    secrets: Iterable[str] = (),
    require_deidentified: bool = True,
) -> Outcome:
    """Run the checks above and return the mutated file's fate (for extra assertions)."""
    capfd.readouterr()
    with tempfile.TemporaryDirectory(prefix="hostile-site-") as tmp:
        folder = Path(tmp) / "data"
        names = write_files(folder, [mutated, *(b for _, b in clean)])
        by_name = dict(zip(names, [planted, *(p for p, _ in clean)], strict=True))
        (folder / "labels.csv").write_text(labels_csv(list(by_name.values())), encoding="utf-8")
        all_secrets = {v for p in by_name.values() for v in p.values()} | set(secrets)
        all_secrets |= {str(folder), str(folder.resolve()), Path(tmp).name}

        with observe() as obs:
            try:
                index, report = scan(folder, require_deidentified=require_deidentified)
            except Exception as exc:  # noqa: BLE001 - the requirement is "never raises"
                pytest.fail(f"{what}: scan_data_dir raised {type(exc).__name__}: {exc!s:.300}")
        used = {rec.relpath: rec for rec in index.instances()}
        assert_classified(report, names, used)
        for rel, rec in used.items():
            assert rec.patient_id == by_name[rel].patient_id, (
                f"{what}: {rel} indexed under patient {rec.patient_id!r}, planted "
                f"{by_name[rel].patient_id!r} (silently re-filed)")
        for rel in names[1:]:
            assert rel in used, f"{what}: clean neighbour {rel} was not used (a bad file spoilt it)"

        flags = [] if require_deidentified else ["--allow-identified"]
        texts = {"scan report": report_json_without_paths(report),
                 "scan warnings": "\n".join(obs.warnings), "scan logs": "\n".join(obs.logs)}
        for mode in ("json", "table"):
            with observe() as cli_obs:
                result = invoke(["node", "check", "--data", str(folder), "--format", mode, *flags])
            assert_clean_exit(result, f"{what}: node check --format {mode}")
            assert result.exit_code == 0, (
                f"{what}: node check --format {mode} exited {result.exit_code}:\n"
                f"{outputs(result)[:1500]}")
            texts[f"node check {mode} output"] = outputs(result)
            texts[f"node check {mode} warnings"] = "\n".join(cli_obs.warnings)
            texts[f"node check {mode} logs"] = "\n".join(cli_obs.logs)
            if mode == "json":
                doc = json.loads(result.stdout)
                assert doc["files_seen"] == len(names)
                assert doc["files_used"] + len(doc["skipped"]) == doc["files_seen"], doc
                assert all(row["code"] and row["text"] for row in doc["skipped"]), doc["skipped"]
        fd = capfd.readouterr()
        texts["real stdout"], texts["real stderr"] = fd.out, fd.err
        assert_no_leak(texts, all_secrets)
        skips = {s.relpath: s for s in report.skipped}
        rec = used.get(MUTATED)
        return Outcome(used=rec is not None, skip=skips.get(MUTATED),
                       patient_id=None if rec is None else rec.patient_id)


def assert_skipped(outcome: Outcome, what: str, *codes: SkipCode) -> SkippedFile:
    """The mutated file was skipped (with one of ``codes`` when given)."""
    assert not outcome.used and outcome.skip is not None, (
        f"{what}: the file was USED (indexed under {outcome.patient_id!r}); it must be skipped")
    if codes:
        assert outcome.skip.code in codes, f"{what}: skipped as {outcome.skip.code}, want {codes}"
    return outcome.skip
