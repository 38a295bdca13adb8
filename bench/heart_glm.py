"""Federated logistic regression over the four UCI Heart Disease hospitals, checked against
statsmodels on the pooled rows.

Usage::

    python bench/heart_glm.py [--json] [--columns age,sex,cp=4,...] [--timeout 120]

Four simulated hospital nodes (Flower's simulation runtime, Ray), one per
``processed.<site>.data`` file of ``../shared/data/heart_disease_uci`` (Cleveland, Hungary,
Switzerland, Long Beach VA), each configured with its own ``tabular-path``. A small ServerApp
calls :func:`server.inference.federated_logistic`, which runs Newton-Raphson with one
``logistic`` query round per step through the real node handler
(:func:`client.queries.handler.handle_query`) and release rules. Rows are filtered as the
data README states (FLamby's Fed-Heart-Disease: ``slope``, ``ca``, ``thal`` dropped, then rows
with a missing value; 303 / 261 / 46 / 130 rows) and the target is ``num > 0``.

The bench then fits ``statsmodels.api.Logit`` on the pooled rows (read directly here, as a
reference only) and reports the coefficients, standard errors, log-likelihood, AIC, BIC and
the largest absolute difference between the two fits over all of them (acceptance: <= 1e-6).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SITES = (
    ("cleveland", "Cleveland"),
    ("hungarian", "Hungary"),
    ("switzerland", "Switzerland"),
    ("va", "Long Beach VA"),
)
DEFAULT_COLUMNS = ("age", "sex", "cp=2", "cp=3", "cp=4", "trestbps", "chol", "fbs",
                   "thalach", "exang", "oldpeak")
TOLERANCE = 1e-6


def site_files() -> list[tuple[str, Path]]:
    """(site name, CSV path) of the four hospitals in the shared data folder."""
    from common.shared_data import require_shared_file

    return [(name, require_shared_file(f"heart_disease_uci/processed.{stem}.data"))
            for stem, name in SITES]


def run_federated(columns: list[str], *, timeout: float, verbose: bool = False) -> dict[str, Any]:
    """Run the federated fit in a Flower simulation; return federated_logistic's result."""
    from flwr.app import Context
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from client.app import build_client_app, simulated_nodes
    from common.config import NodeConfig, TrainPlan
    from server.inference import federated_logistic

    for var, value in (("FLWR_TELEMETRY_ENABLED", "0"), ("FLWR_DISABLE_UPDATE_CHECK", "1"),
                       ("RAY_DEDUP_LOGS", "0"), ("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")):
        os.environ.setdefault(var, value)
    logging.getLogger("flwr").setLevel(logging.INFO if verbose else logging.ERROR)
    files = site_files()
    # The nodes need no image data for this query; data-dir is required by NodeConfig only.
    nodes = {i: NodeConfig(data_dir=path.parent, site_name=name, tabular_path=path,
                           min_release_count=10, stats_noise_multiplier=0.0)
             for i, (name, path) in enumerate(files)}
    results: list[dict[str, Any]] = []
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        del context
        deadline = time.monotonic() + timeout
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < len(nodes) and time.monotonic() < deadline:
            time.sleep(0.5)
            node_ids = list(grid.get_node_ids())
        results.append(federated_logistic(grid, node_ids, columns, timeout=timeout,
                                          plan=TrainPlan(run_id="heart-glm")))

    init_args: dict[str, Any] = {"logging_level": "INFO" if verbose else "ERROR",
                                 "log_to_driver": verbose, "num_cpus": 2}
    run_simulation(
        server_app=server_app,
        client_app=build_client_app(simulated_nodes(nodes)),
        num_supernodes=len(nodes),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                        "init_args": init_args},
        verbose_logging=verbose,
    )
    if not results:
        raise RuntimeError("the simulated ServerApp produced no result (see the log)")
    return results[0]


def pooled_reference(columns: list[str]) -> dict[str, Any]:
    """statsmodels Logit on the pooled rows (the reference the federated fit must equal)."""
    import numpy as np
    import statsmodels.api as sm

    from client.data.tabular import design_matrix, load_tabular

    xs, ys = [], []
    for _, path in site_files():
        x, y = design_matrix(load_tabular(path), columns)
        xs.append(x)
        ys.append(y)
    fit = sm.Logit(np.concatenate(ys), np.vstack(xs)).fit(method="newton", tol=1e-12,
                                                          maxiter=100, disp=0)
    return {"coef": [float(v) for v in fit.params], "se": [float(v) for v in fit.bse],
            "loglik": float(fit.llf), "aic": float(fit.aic), "bic": float(fit.bic),
            "n": int(fit.nobs)}


def compare(federated: dict[str, Any], reference: dict[str, Any]) -> dict[str, float]:
    """Largest absolute differences (coefficients, SEs, loglik, AIC, BIC, and overall)."""
    fit = federated["fit"]
    coef = [c["coef"] for c in fit["coefficients"]]
    se = [c["se"] for c in fit["coefficients"]]
    diffs = {
        "coef": max(abs(a - b) for a, b in zip(coef, reference["coef"], strict=True)),
        "se": max(abs(a - b) for a, b in zip(se, reference["se"], strict=True)),
        "loglik": abs(fit["loglik"] - reference["loglik"]),
        "aic": abs(fit["aic"] - reference["aic"]),
        "bic": abs(fit["bic"] - reference["bic"]),
    }
    diffs["max"] = max(diffs.values())
    return diffs


def _table(federated: dict[str, Any], reference: dict[str, Any], diffs: dict[str, float]) -> str:
    fit = federated["fit"]
    lines = [f"sites: {', '.join(federated['sites'])}; rows: {fit['n']}; Newton query rounds: "
             f"{federated['query_rounds']}",
             f"{'term':<12}{'coef':>14}{'SE':>12}{'z':>9}{'p':>11}{'statsmodels coef':>19}"]
    for row, ref in zip(fit["coefficients"], reference["coef"], strict=True):
        lines.append(f"{row['name']:<12}{row['coef']:>14.6f}{row['se']:>12.6f}{row['z']:>9.3f}"
                     f"{row['p']:>11.2e}{ref:>19.6f}")
    lines.append(f"loglik {fit['loglik']:.6f}  AIC {fit['aic']:.6f}  BIC {fit['bic']:.6f}  "
                 f"LR {fit['lr_stat']:.3f} (df {fit['lr_df']}, p {fit['lr_pvalue']:.2e})")
    lines.append(f"statsmodels: loglik {reference['loglik']:.6f}  AIC {reference['aic']:.6f}  "
                 f"BIC {reference['bic']:.6f}")
    verdict = "OK" if diffs["max"] <= TOLERANCE else "FAIL"
    lines.append(f"largest absolute difference from statsmodels: {diffs['max']:.3e} "
                 f"(<= {TOLERANCE:g}: {verdict})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns 0 when the largest difference is within the tolerance."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    parser.add_argument("--columns", default=",".join(DEFAULT_COLUMNS),
                        help="comma-separated covariates from the node allow-list")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per query round")
    parser.add_argument("--verbose", action="store_true", help="show Flower's and Ray's logs")
    args = parser.parse_args(argv)
    columns = [c.strip() for c in args.columns.split(",") if c.strip()]
    started = time.perf_counter()
    federated = run_federated(columns, timeout=args.timeout, verbose=args.verbose)
    wall = time.perf_counter() - started
    if federated.get("status") != "completed":
        print(json.dumps(federated) if args.json else f"federated fit failed: {federated}")
        return 1
    reference = pooled_reference(columns)
    diffs = compare(federated, reference)
    report = {"columns": columns, "sites": federated["sites"], "failures": federated["failures"],
              "query_rounds": federated["query_rounds"], "wall_s": round(wall, 2),
              "federated": federated["fit"], "statsmodels": reference,
              "max_abs_diff": diffs, "tolerance": TOLERANCE,
              "ok": diffs["max"] <= TOLERANCE}
    print(json.dumps(report) if args.json else _table(federated, reference, diffs))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
