"""The coordinator's workflow of ``--paradigm self-supervised`` (see
:mod:`common.paradigms.self_supervised`).

:func:`pretrain` runs the federated pretext rounds as a run of the stage paradigm
``self-supervised-rounds`` (the nodes train through ``handle_train``, so DP-SGD, the ledger
and the accountant apply) and writes the encoder, the last round's global model without its
output layer, to ``checkpoints/encoder.pt``. :func:`run_self_supervised` is that run plus the
report's paradigm section (pretext loss per round, the encoder's SHA-256).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from flwr.serverapp import Grid

from common import messages as k
from common.config import RunConfig
from common.errors import ConfigError
from common.paradigms import canonical_options, get_paradigm, read_options
from common.paradigms.self_supervised import HEAD_LAYERS, ROUNDS
from server.report import RunReport

__all__ = ["Pretrained", "pretrain", "run_self_supervised", "save_encoder", "with_run_id"]

ENCODER_FILE = "encoder.pt"


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """What :func:`pretrain` produced: its run's report, the encoder file and its SHA-256."""

    report: RunReport
    path: Path
    sha256: str
    tensors: int


def with_run_id(config: RunConfig) -> RunConfig:
    """``config`` with a run id (made as :func:`server.app.run_federation` makes one), so that
    sub-runs can derive theirs from it; a :class:`ConfigError` for a resumed run (its
    sub-runs cannot resume yet)."""
    if config.resume_from:
        raise ConfigError(f"--paradigm {config.plan.paradigm} runs cannot be resumed yet; "
                          "start a new run (the interrupted one's spend stays on the ledgers)")
    if config.plan.run_id:
        return config
    run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(4)
    return dataclasses.replace(config, plan=dataclasses.replace(config.plan, run_id=run_id))


def _last_model(report: RunReport, out_dir: Path) -> dict[str, torch.Tensor]:
    """The global model after the last aggregated round (``final.pt`` when no round's
    checkpoint is there)."""
    from server.final_model import load_checkpoint

    done = [e.round for e in report.rounds if e.train and e.status == "aggregated"]
    arrays = load_checkpoint(out_dir / "checkpoints", max(done)) if done else None
    if arrays is not None:
        return dict(arrays.to_torch_state_dict())
    return dict(torch.load(out_dir / "checkpoints" / "final.pt", weights_only=True))


def pretrain(grid: Grid, config: RunConfig, options: dict[str, Any], *, out_dir: Path,
             run_id: str, target_epsilon: float, rounds: int,
             on_round: Callable[..., None] | None = None,
             on_progress: Callable[..., None] | None = None) -> Pretrained:
    """Federated pretext rounds of ``config``'s model; the encoder in
    ``out_dir/checkpoints/encoder.pt``.

    Raises
    ------
    RuntimeError
        No round aggregated (the run's report, written in ``out_dir``, says why).
    """
    from server.app import run_federation

    stage = {opt.name: options[opt.name] for opt in ROUNDS.options}
    plan = dataclasses.replace(config.plan, paradigm=ROUNDS.name,
                               paradigm_options=canonical_options(stage), run_id=run_id,
                               target_epsilon=target_epsilon, num_rounds=rounds)
    sub = dataclasses.replace(config, plan=plan, out_dir=str(out_dir))
    report = run_federation(grid, sub, on_round=on_round, on_progress=on_progress)
    if not any(e.train and e.status == "aggregated" for e in report.rounds):
        raise RuntimeError(f"self-supervised pretraining failed: {report.reason}")
    path = out_dir / "checkpoints" / ENCODER_FILE
    digest, tensors = save_encoder(_last_model(report, out_dir), config.plan.model, path)
    return Pretrained(report=report, path=path, sha256=digest, tensors=tensors)


def save_encoder(state: dict[str, torch.Tensor], model: str, path: Path) -> tuple[str, int]:
    """Write ``state`` without the output layer of ``model`` (:data:`HEAD_LAYERS`) to
    ``path``; return the file's SHA-256 and the number of tensors written."""
    head = HEAD_LAYERS[model] + "."
    encoder = {name: t for name, t in state.items() if not name.startswith(head)}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(encoder, path)
    return hashlib.sha256(path.read_bytes()).hexdigest(), len(encoder)


def loss_per_round(report: RunReport) -> list[float | None]:
    """The pooled training (pretext) loss of each aggregated round."""
    out: list[float | None] = []
    for entry in report.rounds:
        if entry.train:
            value = entry.train_metrics.get(k.TRAIN_LOSS)
            out.append(float(value) if value is not None and math.isfinite(float(value))
                       else None)
    return out


def run_self_supervised(grid: Grid, config: RunConfig, *,
                        on_round: Callable[..., None] | None = None,
                        on_progress: Callable[..., None] | None = None) -> RunReport:
    """The coordinator's workflow: pretext rounds, ``checkpoints/encoder.pt`` and the report."""
    from server.report_html import write_report_html

    config = with_run_id(config)
    paradigm = get_paradigm(config.plan.paradigm)
    options = read_options(paradigm, config.plan.paradigm_options)
    out_dir = Path(config.out_dir)
    done = pretrain(grid, config, options, out_dir=out_dir, run_id=config.plan.run_id,
                    target_epsilon=config.plan.target_epsilon, rounds=config.plan.num_rounds,
                    on_round=on_round, on_progress=on_progress)
    report = done.report
    report.config = config
    # the pretext run's classification numbers are of the untouched output layer: not a result
    for key in ("inference", "model_selection"):
        report.extra.pop(key, None)
    losses = loss_per_round(report)
    report.extra["paradigm"] = {
        "name": paradigm.name, "summary": paradigm.summary,
        "options": {key: options[key] for key in ("pretext", "views", "mask-ratio", "patch")},
        "encoder": {"checkpoint": f"checkpoints/{ENCODER_FILE}", "sha256": done.sha256,
                    "tensors": done.tensors},
        "notes": [
            f"encoder: checkpoints/{ENCODER_FILE} ({done.tensors} tensors, the model without "
            f"its output layer {HEAD_LAYERS[config.plan.model]}), sha256 {done.sha256}",
            "use it with --init-from or --paradigm transfer -P pretrained=PATH",
            "the validation/test rows of this run score the model's untrained output layer: "
            "they say nothing of the encoder; judge it by fine-tuning",
            "every hospital trained on its training patients only (labels unused; never its "
            "test split); each round's spend is on its ledger under this run id",
        ],
        "tables": [{"title": "epsilon per hospital (this run)",
                    "columns": ["hospital", "patients", "epsilon", "ledger total"],
                    "rows": [[s["site"], s.get("num_examples"), s.get("epsilon"),
                              s.get("epsilon_dataset")] for s in report.sites()]}],
        "plots": [{"title": f"{options['pretext']} pretext loss per round", "x_label": "round",
                   "y_label": "training loss", "x": list(range(1, len(losses) + 1)),
                   "series": {"pretext": losses}}],
    }
    report.write(out_dir)
    write_report_html(report.to_dict(), out_dir / "report.html")
    return report
