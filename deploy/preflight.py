"""Entry point of the Vesalius containers: check the mounts a long-running command needs,
then replace this process with the command.

A hospital node must never train on a writable view of its data, and its privacy ledger and
keys must outlive the container: a ledger written into the container's own layer is lost
with the container, and with it the record of the privacy already spent. So before
``vesalius node start`` (and ``vesalius coordinator start``) this script reads the
container's mount table (``/proc/self/mountinfo``) and refuses to start (exit 78,
EX_CONFIG) when

* a folder named in ``VESALIUS_READONLY_MOUNTS``, or the ``--data`` folder, is not on a
  read-only mount;
* a folder named in ``VESALIUS_VOLUME_MOUNTS``, or the ``--ledger-dir`` / ``--state-dir``
  folder, or the folder of ``--auth-private-key``, lies on the container's root file system
  instead of a mounted volume.

Other commands (``vesalius --help``, ``vesalius audit show ...``) run unchecked.
``VESALIUS_ALLOW_UNMOUNTED=1`` skips the check (a throw-away trial only).

Standard library only: it runs before anything else in the image.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath

EX_CONFIG = 78
"""Exit status for a configuration error (BSD sysexits)."""

GUARDED = {("node", "start"), ("coordinator", "start")}
"""``vesalius`` sub-commands that run a long-lived service and are checked."""

READONLY_OPTIONS = ("--data",)
VOLUME_OPTIONS = ("--ledger-dir", "--state-dir")
VOLUME_FILE_OPTIONS = ("--auth-private-key",)


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo``: where a file system is mounted and how."""

    point: str
    read_only: bool


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` is a space)."""
    out, i = [], 0
    while i < len(field):
        digits = field[i + 1:i + 4]
        if field[i] == "\\" and len(digits) == 3 and digits.isdigit():
            out.append(chr(int(digits, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts of a ``/proc/<pid>/mountinfo`` text, in order (a later mount on the same
    point hides an earlier one).

    Field 5 is the mount point, field 6 the per-mount options (``ro`` or ``rw`` first), as
    documented in proc(5).
    """
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 6:
            continue
        options = fields[5].split(",")
        mounts.append(Mount(point=_unescape(fields[4]), read_only="ro" in options))
    return mounts


def mount_of(path: str, mounts: Sequence[Mount]) -> Mount | None:
    """The mount that holds ``path``: the longest mount point above it, the last if repeated."""
    target = PurePosixPath(os.path.normpath(path))
    best: Mount | None = None
    for mount in mounts:
        point = PurePosixPath(mount.point)
        if target == point or point in target.parents:
            if best is None or len(point.parts) >= len(PurePosixPath(best.point).parts):
                best = mount
    return best


def option_values(argv: Sequence[str], names: Sequence[str]) -> list[str]:
    """Values of ``--name VALUE`` and ``--name=VALUE`` options in ``argv``."""
    values = []
    for i, arg in enumerate(argv):
        for name in names:
            if arg == name and i + 1 < len(argv):
                values.append(argv[i + 1])
            elif arg.startswith(name + "="):
                values.append(arg[len(name) + 1:])
    return values


def is_guarded(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is ``vesalius node start`` or ``vesalius coordinator start``."""
    if len(argv) < 3 or PurePosixPath(argv[0]).name != "vesalius":
        return False
    return (argv[1], argv[2]) in GUARDED


def problems(argv: Sequence[str], mounts: Sequence[Mount], env: Mapping[str, str]) -> list[str]:
    """Every reason not to start ``argv`` in a container with ``mounts`` (empty: start)."""
    if not is_guarded(argv):
        return []
    readonly = env.get("VESALIUS_READONLY_MOUNTS", "").split()
    readonly += option_values(argv, READONLY_OPTIONS)
    volumes = env.get("VESALIUS_VOLUME_MOUNTS", "").split()
    volumes += option_values(argv, VOLUME_OPTIONS)
    volumes += [os.path.dirname(p) or "." for p in option_values(argv, VOLUME_FILE_OPTIONS)]
    found = []
    for path in dict.fromkeys(readonly):
        mount = mount_of(path, mounts)
        if mount is None or not mount.read_only:
            found.append(f"{path} is writable: mount the data read-only "
                         f"(compose: '- /your/data:{path}:ro'; docker run: -v /your/data:{path}:ro)")
    for path in dict.fromkeys(volumes):
        mount = mount_of(path, mounts)
        if mount is None or mount.point == "/":
            found.append(f"{path} is not a mounted volume: what is written there would be lost "
                         f"with the container (compose: a named volume on {path}; "
                         f"docker run: -v NAME:{path})")
    return found


def main(argv: Sequence[str]) -> int:
    """Check, then exec ``argv``; returns only on refusal or a missing command."""
    if not argv:
        print("preflight: no command given", file=sys.stderr)
        return 2
    env = os.environ
    if env.get("VESALIUS_ALLOW_UNMOUNTED") != "1":
        try:
            with open("/proc/self/mountinfo", encoding="utf-8") as handle:
                mounts = parse_mountinfo(handle.read())
        except OSError:
            mounts = []
        found = problems(argv, mounts, env)
        if found:
            for reason in found:
                print(f"preflight: refusing to start: {reason}", file=sys.stderr)
            return EX_CONFIG
    try:
        os.execvp(argv[0], list(argv))
    except OSError as exc:
        print(f"preflight: cannot run {argv[0]}: {exc.strerror}", file=sys.stderr)
    return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
