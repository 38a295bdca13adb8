"""Build the CPU node image and run it — only where a container engine answers.

CI has no engine (the tests skip, saying so). Where one runs, the image is built from
``deploy/Dockerfile.node`` as a hospital would build it; a sandbox without Docker Hub or
PyTorch's index passes stand-ins through the environment:

``VESALIUS_TEST_ENGINE``            docker (default) or podman
``VESALIUS_TEST_PYTHON_IMAGE``      a local image in place of the python:3.11 base
``VESALIUS_TEST_TORCH_INDEX_URL``   a local index holding torch's CPU wheel
``VESALIUS_TEST_BUILD_NETWORK``     e.g. ``host`` (for an index on loopback)
``VESALIUS_TEST_NODE_IMAGE``        an image already built from Dockerfile.node: no build
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator

import pytest

from tests.deploy.deploy_helpers import ROOT

pytestmark = pytest.mark.slow

ENGINE = os.environ.get("VESALIUS_TEST_ENGINE", "docker")
BUILD_TIMEOUT_S = 2400


def _engine(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ENGINE, *args], capture_output=True, text=True, timeout=timeout)


def _engine_answers() -> str | None:
    """None when the engine runs containers; else why not."""
    if shutil.which(ENGINE) is None:
        return f"no container engine ({ENGINE} not installed)"
    try:
        info = _engine("info", timeout=30)
    except subprocess.TimeoutExpired:
        return f"{ENGINE} info did not answer in 30 s"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["no output"])[-1]
        return f"{ENGINE} is installed but no engine answers: {last}"
    return None


@pytest.fixture(scope="module")
def node_image() -> Iterator[str]:
    why = _engine_answers()
    if why is not None:
        pytest.skip(why)
    given = os.environ.get("VESALIUS_TEST_NODE_IMAGE")
    if given:
        yield given
        return
    tag = f"vesalius-node:test-{uuid.uuid4().hex[:8]}"
    cmd = ["build", "-f", "deploy/Dockerfile.node", "-t", tag]
    for env, arg in (("VESALIUS_TEST_PYTHON_IMAGE", "PYTHON_IMAGE"),
                     ("VESALIUS_TEST_TORCH_INDEX_URL", "TORCH_INDEX_URL")):
        if os.environ.get(env):
            cmd += ["--build-arg", f"{arg}={os.environ[env]}"]
    if os.environ.get("VESALIUS_TEST_BUILD_NETWORK"):
        cmd += ["--network", os.environ["VESALIUS_TEST_BUILD_NETWORK"]]
    built = subprocess.run([ENGINE, *cmd, str(ROOT)], capture_output=True, text=True,
                           timeout=BUILD_TIMEOUT_S, env={**os.environ, "DOCKER_BUILDKIT": "0"})
    assert built.returncode == 0, (built.stdout + built.stderr)[-4000:]
    yield tag
    _engine("rmi", "-f", tag)


@pytest.fixture
def volumes() -> Iterator[dict[str, str]]:
    """Fresh named volumes (as compose makes them), removed afterwards."""
    names = {role: f"vesalius-test-{role}-{uuid.uuid4().hex[:8]}"
             for role in ("data", "ledger", "keys", "ca")}
    for name in names.values():
        assert _engine("volume", "create", name).returncode == 0
    yield names
    for name in names.values():
        _engine("volume", "rm", "-f", name)


def _run(image: str, *args: str, mounts: tuple[str, ...] = (),
         timeout: float = 300) -> subprocess.CompletedProcess[str]:
    flags = ["run", "--rm", "--network", "none", "--cap-drop", "ALL",
             "--security-opt", "no-new-privileges:true"]
    for mount in mounts:
        flags += ["-v", mount]
    return _engine(*flags, image, *args, timeout=timeout)


def test_image_runs_the_cli_as_uid_10001(node_image: str) -> None:
    helped = _run(node_image, "vesalius", "--help")
    assert helped.returncode == 0, helped.stderr
    for command in ("node", "audit", "federation"):
        assert command in helped.stdout
    ident = _run(node_image, "id", "-u")
    assert ident.stdout.strip() == "10001"
    torch = _run(node_image, "python", "-c", "import torch; print(torch.__version__, "
                 "torch.version.cuda)")
    assert torch.stdout.split() == ["2.13.0+cpu", "None"], torch.stderr


def test_node_start_with_the_compose_volume_layout(node_image: str,
                                                   volumes: dict[str, str]) -> None:
    """Keys and certificates made in fresh named volumes by UID 10001; `node start` passes
    the preflight and the data check and stops only at the (absent) coordinator; the same
    with the data mounted writable is refused before anything starts."""
    made = [
        _run(node_image, "vesalius", "synth", "--out", "/var/lib/vesalius/ledger", "--sites",
             "1", "--patients", "8", mounts=(f"{volumes['data']}:/var/lib/vesalius/ledger",)),
        _run(node_image, "vesalius", "node", "keys", "--out", "/var/lib/vesalius/keys",
             "--site-name", "hospital-a", mounts=(f"{volumes['keys']}:/var/lib/vesalius/keys",)),
        _run(node_image, "vesalius", "federation", "certs", "--out", "/var/lib/vesalius/ca",
             "--host", "coordinator", mounts=(f"{volumes['ca']}:/var/lib/vesalius/ca",)),
    ]
    for result in made:
        assert result.returncode == 0, result.stdout + result.stderr
    start = ["vesalius", "node", "start", "--data", "/data/site-1",
             "--superlink", "coordinator:9093",
             "--root-certificates", "/var/lib/vesalius/ca/ca.crt",
             "--auth-private-key", "/var/lib/vesalius/keys/node-key",
             "--site-name", "hospital-a", "--ledger-dir", "/var/lib/vesalius/ledger",
             "--port", "9094", "--max-attempts", "1"]
    layout = (f"{volumes['ledger']}:/var/lib/vesalius/ledger",
              f"{volumes['keys']}:/var/lib/vesalius/keys:ro",
              f"{volumes['ca']}:/var/lib/vesalius/ca:ro")
    refused = _run(node_image, *start, mounts=(f"{volumes['data']}:/data", *layout))
    assert refused.returncode == 78, refused.stdout + refused.stderr
    assert "/data is writable" in refused.stderr
    reached = _run(node_image, *start, mounts=(f"{volumes['data']}:/data:ro", *layout))
    output = reached.stdout + reached.stderr
    assert reached.returncode == 8, output  # gave up on the coordinator (cli.supernode)
    assert "usable files" in output and "coordinator" in output
