"""The comparisons of ``bench/paradigms.py``: one module per paradigm family.

Each module defines ``run(work: pathlib.Path, quick: bool) -> list[dict]``: its rows, each with
``comparison`` (e.g. "scratch vs self-supervised + transfer"), ``data`` (which real set of
``../shared/data``), ``variant``, ``metric``, ``federated`` (the federated DP value, 3 hospitals,
ε ≤ 8), ``pooled`` (the pooled non-private baseline of the same run) and any extra measures
(``ece``, ``error_auroc``, ...). ``bench/paradigms.py`` imports every module here.
"""
