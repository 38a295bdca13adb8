"""Learning paradigms side by side: each against its plain counterpart and a pooled baseline.

Issue 16's acceptance: on the real data in ``../shared/data`` (``VESALIUS_SHARED_DATA`` or the
path setting the tests use), 3 hospitals, equal ε ≤ 8, one line per variant with its pooled
non-private baseline from the same run:

* scratch vs self-supervised pretraining + transfer;
* supervised on 10 % of the labels vs semi-supervised with the other 90 % unlabelled;
* single model vs ensemble (AUC, ECE, AUROC of uncertainty for error detection);
* single-task vs multi-task;
* slice-level vs multi-instance learning on the 3D set.

The comparisons live in :mod:`bench.paradigm_cases` (one module each); ``--only NAME`` runs
one. Run it on a quiet machine::

    .venv/bin/python bench/paradigms.py --json --quick
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bench.paradigm_cases as cases  # noqa: E402 - after the path is set


def case_names() -> list[str]:
    """Every comparison module of :mod:`bench.paradigm_cases`, by name."""
    return sorted(info.name for info in pkgutil.iter_modules(cases.__path__))


def run_case(name: str, work: Path, quick: bool) -> list[dict[str, Any]]:
    """The rows of one comparison; one row saying why when it fails (the others still run)."""
    module = importlib.import_module(f"bench.paradigm_cases.{name}")
    started = time.perf_counter()
    try:
        rows = list(module.run(work / name, quick))
    except Exception as exc:  # noqa: BLE001 - one failed comparison must not hide the others
        traceback.print_exc(file=sys.stderr)
        return [{"comparison": name, "error": f"{type(exc).__name__}: {exc}"}]
    for row in rows:
        row.setdefault("comparison", name)
        row["case_seconds"] = round(time.perf_counter() - started, 1)
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def print_table(rows: list[dict[str, Any]]) -> None:
    """One line per variant: federated DP beside pooled non-private, and their ratio."""
    print(f"{'comparison':<38} {'variant':<30} {'metric':<10} {'federated':>10} "
          f"{'pooled':>10} {'ratio':>6}")
    for row in rows:
        if "error" in row:
            print(f"{row['comparison']:<38} failed: {row['error']}")
            continue
        fed, pooled = row.get("federated"), row.get("pooled")
        ratio = (fed / pooled if isinstance(fed, float) and isinstance(pooled, float) and pooled
                 else "")
        print(f"{row['comparison']:<38} {row.get('variant', ''):<30} {row.get('metric', ''):<10} "
              f"{_fmt(fed):>10} {_fmt(pooled):>10} {_fmt(ratio):>6}")


def main() -> None:
    """Command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and patients")
    parser.add_argument("--only", nargs="+", choices=case_names(), default=None)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="vesalius-paradigms-"))
    rows: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    for name in args.only or case_names():
        print(f"running {name} ...", file=sys.stderr, flush=True)
        rows.extend(run_case(name, work, args.quick))
    if args.json:
        print(json.dumps({"rows": rows, "quick": args.quick, "load_before": load_before,
                          "load_after": os.getloadavg(), "work": str(work)}, indent=2))
    else:
        print_table(rows)


if __name__ == "__main__":
    main()
