"""Child process for the crash tests: writes ledger entries, then dies by SIGKILL.

Usage: ``python -m tests.common.ledger._writer LEDGER MODE``

* ``partial``: append 3 entries, then write the first half of a genuine 4th record line
  (built by appending to a scratch copy of the file, so its chain link is real), flush it to
  the file, print ``ready`` and sleep until killed.
* ``loop``: print ``ready`` and append entries forever (the parent kills it at a random time).
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

from common.ledger import Ledger
from tests.common.ledger.conftest import entry


def main() -> None:
    path, mode = Path(sys.argv[1]), sys.argv[2]
    ledger = Ledger(path)
    if mode == "loop":
        print("ready", flush=True)
        i = 0
        while True:
            ledger.append(entry(round=i))
            i += 1
    for i in range(3):
        ledger.append(entry(round=i))
    scratch = path.with_name("scratch.jsonl")
    shutil.copy(path, scratch)
    Ledger(scratch, key_path=ledger.key_path).append(entry(round=3))
    line = scratch.read_bytes().splitlines(keepends=True)[-1]
    with open(path, "ab") as fh:
        fh.write(line[: len(line) // 2])
        fh.flush()
        os.fsync(fh.fileno())
    print("ready", flush=True)
    time.sleep(600)


if __name__ == "__main__":
    main()
