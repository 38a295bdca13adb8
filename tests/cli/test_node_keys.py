"""``vesalius node keys``: a key pair Flower's SuperNode authentication accepts, owner-only,
never overwritten silently."""

from __future__ import annotations

import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from typer.testing import CliRunner

from cli.app import app


def _keys(out: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["node", "keys", "--out", str(out), *args],
                                env={"COLUMNS": "300"})
    return result.exit_code, result.output


def test_the_pair_is_what_flower_loads_and_the_private_key_is_owner_only(tmp_path: Path) -> None:
    from flwr.cli.supernode.register import try_load_public_key

    # Execute
    code, output = _keys(tmp_path / "k", "--site-name", "hosp-a")
    # Assert: flower-supernode's private-key loader and `flwr supernode register`'s
    # public-key check both accept the files; the private key is 0600
    assert code == 0, output
    private, public = tmp_path / "k" / "node-key", tmp_path / "k" / "node-key.pub"
    key = load_ssh_private_key(private.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # raises (exits) on a key Flower would refuse
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert public.read_text().split()[2] == "vesalius-hosp-a"
    assert "node-key.pub" in output and "--auth-private-key" in output
    assert "BEGIN OPENSSH PRIVATE KEY" not in output  # the private key is never printed


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen is not installed")
def test_the_printed_fingerprint_is_ssh_keygens(tmp_path: Path) -> None:
    code, output = _keys(tmp_path / "k")
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(tmp_path / "k" / "node-key.pub")],
                            capture_output=True, text=True, check=True).stdout.split()[1]
    assert code == 0 and listed in output


def test_an_existing_key_is_never_replaced_silently(tmp_path: Path) -> None:
    # Prepare
    code, _ = _keys(tmp_path / "k")
    before = (tmp_path / "k" / "node-key").read_bytes()
    # Execute
    again, output = _keys(tmp_path / "k")
    forced, _ = _keys(tmp_path / "k", "--force")
    # Assert: refused with the config exit code and a sentence; replaced only with --force
    assert code == 0 and again == 3 and "--force" in output and "Traceback" not in output
    assert forced == 0 and (tmp_path / "k" / "node-key").read_bytes() != before
    assert stat.S_IMODE((tmp_path / "k" / "node-key").stat().st_mode) == 0o600
