"""``vesalius federation``: what a coordinator operator runs."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import click
import typer
from rich.markup import escape

from cli.console import console, err_console, setup_logging
from cli.flower import APP_DIR, CONNECTION, executable, flower_env, toml_value, write_connection
from cli.options import (
    NON_NEGATIVE,
    OUTPUT_FORMATS,
    POSITIVE,
    existing_file,
    existing_folder,
    model_choice,
    resolved,
)
from cli.report_view import print_report
from cli.run_progress import run_view
from common.config import SAMPLE_KINDS, SIMULATION_ENGINES, NodeConfig, RunConfig, TrainPlan
from common.errors import ConfigError, ConnectionProblem
from common.models.registry import get_spec
from common.tasks.federated import FEDERATED_TASKS, federated_task, plan_samples
from common.tasks.registry import serves

federation_app = typer.Typer(help="Start and follow federated runs.", no_args_is_help=True)


# Options shared by `run` and `cv` (one definition each).
_SUPERLINK = typer.Option(None, "--superlink", help="SuperLink address (HOST:PORT of its Control API). Omit to simulate.")
_DATA_ROOT = typer.Option(None, "--data-root", callback=existing_folder("--data-root"),
                          help="Simulation: folder with site-* data folders.")
_LOCAL_EPOCHS = typer.Option(1, "--local-epochs", min=1)
_BATCH_SIZE = typer.Option(32, "--batch-size", min=1)
_LR = typer.Option(0.05, "--lr", click_type=POSITIVE, help="Learning rate (> 0).")
_NOISE = typer.Option(0.0, "--noise-multiplier", click_type=NON_NEGATIVE,
                      help="Fix σ instead of deriving it from --epsilon (0 = derive).")
_CLIP = typer.Option(1.0, "--max-grad-norm", click_type=POSITIVE,
                     help="Per-patient L2 clipping bound (> 0).")
_NON_PRIVATE = typer.Option(False, "--non-private", help="Baseline without DP (nodes must allow it).")
_MODEL = typer.Option("cnn", "--model", click_type=model_choice(),
                      help="Model from the zoo (`vesalius models list`).")
_IMAGE_SIZE = typer.Option(32, "--image-size", min=8, help="Side of the square input in pixels.")
_MIN_NODES = typer.Option(2, "--min-nodes", min=1)
_MIN_RELEASE = typer.Option(10, "--min-release-count", min=0, help="Simulation: each simulated hospital's minimum release count (exact releases of fewer patients are refused; small cells suppressed).")
_EPSILON_CAP = typer.Option(8.0, "--epsilon-cap", click_type=POSITIVE,
                            help="Simulation: each simulated hospital's cap (> 0).")
_ON_REFUSAL = typer.Option("exclude", "--on-refusal", click_type=click.Choice(["exclude", "stop"]),
                           help="When a node refuses the plan (its budget): 'exclude' it from the rest of the run, or 'stop' the run.")
_LEDGER_DIR = typer.Option(None, "--ledger-dir", callback=resolved,
                           help="Simulation: folder of the simulated hospitals' privacy ledgers, one sub-folder per site (default: 'ledgers' beside --data-root). A dataset's budget lives there across runs.")
_PHYSICAL_BATCH = typer.Option(
    0, "--physical-batch-size", min=0,
    help="Simulation: each simulated hospital's largest forward/backward pass in DP training, "
    "in samples (0 = automatic: volumes in parts of half the batch size, 2D images whole). "
    "Bounds the memory of large Poisson batches; the step and its ε are the same.")
_INSECURE = typer.Option(False, "--insecure", help="Plain-text connection (loopback tests only).")
_ROOT_CERTIFICATES = typer.Option(None, "--root-certificates",
                                  callback=existing_file("--root-certificates"),
                                  help="CA certificate that signed the SuperLink's TLS certificate.")
_FLWR_HOME = typer.Option(None, "--flwr-home", callback=resolved, help="FLWR_HOME for `flwr run`.")
_OUTPUT_FORMAT = typer.Option("table", "--format", click_type=click.Choice(list(OUTPUT_FORMATS)),
                              help="table or json.")
_VERBOSE = typer.Option(False, "--verbose", "-v", help="Show Flower's own log lines too.")
_ENGINE = typer.Option(
    SIMULATION_ENGINES[0], "--engine", click_type=click.Choice(list(SIMULATION_ENGINES)),
    envvar="VESALIUS_SIMULATION_ENGINE",
    help="Simulation only: 'inprocess' runs every hospital in this process in turn (no start-up "
    "cost); 'ray' runs them on Ray's actor processes, one per CPU, in parallel.")
_TASK = typer.Option(
    "binary", "--task", click_type=click.Choice(list(FEDERATED_TASKS)),
    help="Learning task: binary (labels 0/1; pooled AUC and an operating point), multiclass "
    "(labels 0..K-1), ordinal (grades 0..K-1), multilabel (findings 0..K-1), regression "
    "(a value), segmentation (masks; U-Net) or reconstruction (self-supervised pretraining, "
    "no labels). `vesalius models list` shows which models serve which task.")
_NUM_CLASSES = typer.Option(
    None, "--num-classes", min=2,
    help="K: classes (multiclass), grades (ordinal), findings (multilabel) or mask classes "
    "with background (segmentation); default 2. The binary task has 2.")
_SAMPLES = typer.Option(
    None, "--samples", click_type=click.Choice(list(SAMPLE_KINDS)),
    help="What one sample is: image-2d (one record per image), volume-3d (a study's series as "
    "one volume, for cnn3d, resnet, densenet, ...) or series (the volume read slice by slice: "
    "lstm, gru). Default: the first kind the model serves for the task.")
_SECURE_AGGREGATION = typer.Option(
    "auto", "--secure-aggregation", click_type=click.Choice(["auto", "on", "off"]),
    help="Secure aggregation: the coordinator sees only the sum of the hospitals' updates, "
    "example counts and score histograms (auto: on when at least 3 hospitals take part).")
_MIN_SURVIVORS = typer.Option(
    0, "--min-survivors", min=0,
    help="Secure aggregation: fewest hospitals a round may end with; below it the round is "
    "abandoned (0 = max(3, ceil(2n/3)), at most n; 1 is refused).")
_SECAGG_NEIGHBOURS = typer.Option(
    0, "--secagg-neighbours", min=0,
    help="Secure aggregation: how many other hospitals each one shares its secrets with "
    "(0 = all up to 40 hospitals, 40 drawn at random beyond: SecAgg+, whose sessions stay "
    "cheap; a hospital's update is then hidden unless a majority of its group colludes with "
    "the coordinator). At least the number of hospitals: full sharing at any size (slow "
    "beyond ~40).")
_INIT_FROM = typer.Option(
    None, "--init-from", callback=existing_file("--init-from"),
    help="Checkpoint (e.g. an earlier run's checkpoints/final.pt, such as a reconstruction "
    "pretraining) whose tensors of matching name and shape initialise the model.")
_PARADIGM = typer.Option(
    "supervised", "--paradigm",
    help="Learning paradigm: supervised (default) or another one `vesalius federation "
    "paradigms` lists (self-supervised pretraining, transfer, semi-supervised, ...).")
_PARADIGM_OPTION = typer.Option(
    None, "--paradigm-option", "-P", metavar="KEY=VALUE",
    help="A setting of the paradigm (repeatable); `vesalius federation paradigms` lists them.")
_AUGMENT = typer.Option(
    "none", "--augment", click_type=click.Choice(["none", "light", "strong", "auto"]),
    help="Data augmentation of each training record at the hospitals (MONAI transforms chosen "
    "per task and modality; auto: light where it is safe for the task, none otherwise).")
_TARGET_SENSITIVITY = typer.Option(
    None, "--target-sensitivity", click_type=click.FloatRange(0.0, 1.0, min_open=True),
    help="Operating point: the highest threshold whose validation sensitivity reaches S "
    "(0 < S <= 1). Default: Youden's J on the validation patients.")


def build_run_config(
    *, rounds: int, local_epochs: int, batch_size: int, learning_rate: float, epsilon: float,
    noise_multiplier: float, max_grad_norm: float, private: bool, model: str, image_size: int,
    seed: int, out: Path, min_nodes: int, on_refusal: str = "exclude", model_phase: str = "",
    hospital_dp_noise: float = 0.0, hospital_dp_clip: float = 0.0,
    target_sensitivity: float | None = None, task: str = "binary",
    num_classes: int | None = None, samples: str | None = None, init_from: Path | None = None,
    secure_aggregation: str = "auto", secagg_min_survivors: int = 0, secagg_neighbours: int = 0,
    paradigm: str = "supervised", paradigm_options: list[str] | None = None, cv: bool = False,
    augment: str = "none",
) -> RunConfig:
    """Typed run config from CLI options (validated on construction).

    The task must be one a federation trains and the model one that serves it
    (:func:`common.tasks.federated.federated_task`); otherwise a :class:`ConfigError` that
    names the models serving the task.
    """
    from common.paradigms import canonical_options, get_paradigm, parse_option_pairs

    chosen_paradigm = get_paradigm(paradigm)
    if chosen_paradigm.stage:
        raise ConfigError(f"paradigm {paradigm!r} is a stage that other paradigms' workflows "
                          "run; choose one of those `vesalius federation paradigms` lists")
    if cv and not chosen_paradigm.cv:
        raise ConfigError(f"paradigm {paradigm!r} cannot run as a cross-validation; use "
                          "`vesalius federation run --paradigm` instead")
    if chosen_paradigm.tasks and task not in chosen_paradigm.tasks:
        raise ConfigError(f"paradigm {paradigm!r} serves the tasks "
                          f"{', '.join(chosen_paradigm.tasks)}, not {task!r}")
    options = parse_option_pairs(chosen_paradigm, paradigm_options or [])
    chosen = federated_task(task, model)
    if samples is None:
        samples = serves(chosen, get_spec(model))[0].value
    plan_samples(chosen, model, samples)
    plan = TrainPlan(
        num_rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
        learning_rate=learning_rate, private=private, target_epsilon=epsilon,
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm, model=model,
        image_size=image_size, seed=seed, model_phase=model_phase, task=task,
        num_classes=2 if num_classes is None else num_classes, samples=samples,
        paradigm=paradigm, paradigm_options=canonical_options(options), augment=augment,
    )
    if chosen_paradigm.check is not None:
        chosen_paradigm.check(plan, options)
    return RunConfig(plan=plan, out_dir=str(out.resolve()), min_nodes=min_nodes,
                     on_refusal=on_refusal, hospital_dp_noise=hospital_dp_noise,
                     hospital_dp_clip=hospital_dp_clip,
                     target_sensitivity=target_sensitivity or 0.0,
                     init_from=str(init_from) if init_from is not None else "",
                     secure_aggregation=secure_aggregation,
                     secagg_min_survivors=secagg_min_survivors,
                     secagg_neighbours=secagg_neighbours)


def site_dirs(data_root: Path) -> list[Path]:
    """The ``site-*`` folders of a demo federation, in order."""
    dirs = sorted(p for p in data_root.iterdir() if p.is_dir() and p.name.startswith("site-"))
    if not dirs:
        raise typer.BadParameter(f"no site-* folders in {data_root} (make some with `vesalius synth`)")
    return dirs


def default_ledger_root(data_root: Path) -> Path:
    """Where simulated hospitals keep their privacy ledgers: ``<data_root>/../ledgers``.

    Outside the data folders (a ledger must never be scanned as data) and stable across runs,
    so that a dataset's budget spans every run made on it.
    """
    return data_root.resolve().parent / "ledgers"


def simulated_hospitals(data_root: Path, *, epsilon_cap: float, allow_non_private: bool,
                        min_release_count: int, ledger_root: Path | None = None,
                        physical_batch_size: int = 0) -> list[NodeConfig]:
    """One NodeConfig per ``site-*`` folder: a simulated hospital on this machine.

    Simulated hospitals may release score histograms (for the pooled AUC); each keeps its
    ledger in ``ledger_root / <site>`` (default :func:`default_ledger_root`).
    """
    ledgers = ledger_root if ledger_root is not None else default_ledger_root(data_root)
    return [
        NodeConfig(data_dir=d, epsilon_cap=epsilon_cap, site_name=d.name,
                   allow_non_private=allow_non_private, release_histograms=True,
                   ledger_dir=ledgers / d.name, min_release_count=min_release_count,
                   physical_batch_size=physical_batch_size)
        for d in site_dirs(data_root)
    ]


def check_simulation(nodes: list[NodeConfig], config: RunConfig, *, folds: int = 0) -> None:
    """Refuse, before anything starts, a simulation its hospitals cannot run.

    ``--min-nodes`` above the number of ``site-*`` folders, or (cross-validation) more folds
    than a hospital has labelled patients, would otherwise fail only once Ray has started.
    """
    if len(nodes) < config.min_nodes:
        raise typer.BadParameter(
            f"{config.min_nodes} nodes are required but --data-root holds {len(nodes)} "
            "site-* folder(s); lower --min-nodes or add hospitals", param_hint="'--min-nodes'")
    if folds < 2 or config.plan.task in ("segmentation", "reconstruction"):
        return  # no labels file to count patients from; the nodes refuse too few themselves
    from client.data.labels import LABELS_FILENAME, parse_targets

    plan = config.plan
    for node in nodes:
        table = parse_targets(Path(node.data_dir) / LABELS_FILENAME, plan.task,
                              None if plan.task == "regression" else plan.num_classes)
        patients = {pid for pid, _ in table.targets}
        if len(patients) < folds:
            raise typer.BadParameter(
                f"{node.site_name} has {len(patients)} labelled patient(s), fewer than the "
                f"{folds} folds (each fold holds out patients at every hospital); lower --folds",
                param_hint="'--folds'")


def announce_ledgers(ledger_root: Path) -> None:
    """Say where the simulated hospitals' budgets live, and how to start a fresh one."""
    console.print(f"privacy ledgers: {ledger_root}/<site> (each simulated hospital's ε spent on "
                  "this data, across runs; a fresh budget needs fresh data from `vesalius synth` "
                  "or another --ledger-dir)", highlight=False)


def simulate(config: RunConfig, data_root: Path, *, epsilon_cap: float, allow_non_private: bool,
             verbose: bool, ledger_root: Path | None = None,
             min_release_count: int = 10, show_progress: bool = True,
             engine: str | None = None, physical_batch_size: int = 0) -> dict[str, object]:
    """Run a simulated federation over the ``site-*`` folders of ``data_root``."""
    ledgers = ledger_root if ledger_root is not None else default_ledger_root(data_root)
    nodes = simulated_hospitals(data_root, epsilon_cap=epsilon_cap,
                                allow_non_private=allow_non_private,
                                min_release_count=min_release_count, ledger_root=ledgers,
                                physical_batch_size=physical_batch_size)
    check_simulation(nodes, config)
    elm = get_spec(config.plan.model).family == "elm"  # one closed-form readout round
    total = 1 if elm else config.plan.num_rounds
    how = "closed-form readout" if elm else f"{total} rounds"
    dp = ("one Gaussian release" if elm else "DP-SGD") + f", target ε={config.plan.target_epsilon:g}"
    console.print(f"simulating {len(nodes)} hospitals x {how} "
                  f"({dp if config.plan.private else 'non-private'}; task {config.plan.task})")
    announce_ledgers(ledgers)
    with run_view(total, enabled=show_progress, verbose=verbose,
                  learning_task=config.plan.task) as view:
        # Imported under the bar: torch, Flower and Ray take seconds to load.
        from server.report import round_dict
        from server.simulation import run_simulation

        report = run_simulation(config, nodes, on_round=lambda e: view.on_round(round_dict(e)),
                                on_progress=view.on_progress, verbose=verbose, engine=engine)
    doc = report.to_dict()
    hint_if_budget_refused(doc, ledgers)
    return doc


def hint_if_budget_refused(doc: Mapping[str, Any], ledger_root: Path) -> None:
    """After a refusal for budget: where the spend is recorded and how to get a fresh budget."""
    reasons = [str(row.get("reason", "")) for row in doc.get("excluded") or []]
    reasons += [str(err.get("reason", "")) for entry in doc.get("rounds") or []
                for err in entry.get("errors") or []]
    if any("epsilon cap" in reason or "budget" in reason for reason in reasons):
        err_console.print(
            f"[yellow]a simulated hospital refused for its privacy budget: earlier runs on this "
            f"data already spent it (ledgers in {ledger_root}). That is the privacy model "
            "working; for a fresh budget use new synthetic data (`vesalius synth --out DIR`) or "
            "another --ledger-dir.[/yellow]", highlight=False)


def _connection_hint(output: list[str], superlink: str) -> str | None:
    """Why ``flwr run`` could not reach the SuperLink, from its output (None: another cause)."""
    text = "\n".join(output[-200:]).lower()
    if any(word in text for word in ("ssl", "certificate", "handshake")):
        return (f"the TLS handshake with the SuperLink at {superlink} failed: give the CA "
                "certificate that signed its certificate (--root-certificates), or --insecure "
                "for a plain-text development SuperLink")
    if any(word in text for word in ("unavailable", "connection refused", "failed to connect",
                                     "deadline exceeded", "name resolution")):
        return (f"no SuperLink answered at {superlink}: check the address and port (the "
                "SuperLink's Control API) and that it is running")
    return None


def run_on_superlink(config: RunConfig, superlink: str, *, insecure: bool,
                     root_certificates: Path | None, flwr_home: Path | None,
                     extra: Mapping[str, object] | None = None, verbose: bool = False,
                     num_folds: int = 1, show_progress: bool = True) -> dict[str, object]:
    """Submit the run to a SuperLink with ``flwr run --stream`` and read the report it writes.

    ``extra`` adds run-config overrides (e.g. the cross-validation keys). The ServerApp's
    progress and round markers drive the same live view as a simulation.
    """
    home = flwr_home or Path(tempfile.mkdtemp(prefix="vesalius-flwr-"))
    write_connection(home, superlink, insecure=insecure, root_cert=root_certificates)
    values = {**config.to_dict(), **dict(extra or {})}
    overrides = " ".join(f"{key}={toml_value(v)}" for key, v in values.items())
    cmd = [executable("flwr"), "run", str(APP_DIR), CONNECTION, "--run-config", overrides, "--stream"]
    report_path = Path(config.out_dir) / "report.json"
    if report_path.exists():  # never show an earlier run's report as this one's
        kept = report_path.with_name(f"report-{int(report_path.stat().st_mtime)}.json")
        report_path.rename(kept)
        err_console.print(f"an earlier report in {config.out_dir} was kept as {kept.name}")
    console.print(f"submitting run to SuperLink {superlink}")
    output: list[str] = []
    with run_view(config.plan.num_rounds, num_folds, enabled=show_progress,
                  verbose=verbose, learning_task=config.plan.task) as view:
        proc = subprocess.Popen(cmd, env=flower_env(home), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace")
        assert proc.stdout is not None
        for line in proc.stdout:
            output.append(line)
            view.feed_line(line)
        returncode = proc.wait()
    if returncode != 0:
        hint = _connection_hint(output, superlink)
        if hint is not None:
            raise ConnectionProblem(f"the run did not start: {hint}")
        err_console.print(f"[red]error:[/red] the run did not complete (flwr run exit {returncode}); "
                          "see Flower's messages above and the SuperLink's log")
        raise typer.Exit(1)
    if not report_path.exists():
        err_console.print(f"[red]error:[/red] the ServerApp wrote no report to {report_path} "
                          "(see the SuperLink's log; --out must be a path on the coordinator)")
        raise typer.Exit(1)
    return json.loads(report_path.read_text(encoding="utf-8"))


@federation_app.command("run")
def run(
    superlink: str | None = _SUPERLINK,
    data_root: Path | None = _DATA_ROOT,
    out: Path = typer.Option(Path("vesalius-out"), "--out", callback=resolved, help="Where report.json and checkpoints go."),
    rounds: int = typer.Option(5, "--rounds", min=1),
    local_epochs: int = _LOCAL_EPOCHS,
    batch_size: int = _BATCH_SIZE,
    learning_rate: float = _LR,
    epsilon: float = typer.Option(8.0, "--epsilon", click_type=POSITIVE, help="Target patient-level ε per hospital for the whole run (> 0)."),
    noise_multiplier: float = _NOISE,
    max_grad_norm: float = _CLIP,
    non_private: bool = _NON_PRIVATE,
    model: str = _MODEL,
    image_size: int = _IMAGE_SIZE,
    seed: int = typer.Option(42, "--seed"),
    min_nodes: int = _MIN_NODES,
    epsilon_cap: float = _EPSILON_CAP,
    on_refusal: str = _ON_REFUSAL,
    min_release_count: int = _MIN_RELEASE,
    ledger_dir: Path | None = _LEDGER_DIR,
    model_phase: str = typer.Option("", "--model-phase", help="DBN/DBM training phase: finetune, pretrain or pretrain:<layer>."),
    hospital_dp_noise: float = typer.Option(0.0, "--hospital-dp-noise", click_type=NON_NEGATIVE, help="Hospital-level DP on top of patient-level DP: noise multiplier on the clipped model updates (0 = off)."),
    hospital_dp_clip: float = typer.Option(0.0, "--hospital-dp-clip", click_type=NON_NEGATIVE, help="Hospital-level DP: L2 bound of each hospital's model update."),
    target_sensitivity: float | None = _TARGET_SENSITIVITY,
    task: str = _TASK,
    num_classes: int | None = _NUM_CLASSES,
    samples: str | None = _SAMPLES,
    init_from: Path | None = _INIT_FROM,
    secure_aggregation: str = _SECURE_AGGREGATION,
    min_survivors: int = _MIN_SURVIVORS,
    secagg_neighbours: int = _SECAGG_NEIGHBOURS,
    paradigm: str = _PARADIGM,
    paradigm_option: list[str] | None = _PARADIGM_OPTION,
    augment: str = _AUGMENT,
    resume: Path | None = typer.Option(
        None, "--resume", callback=resolved,
        help="Continue the interrupted run whose output folder (its --out) this is: from its "
        "last aggregated round's checkpoint, with its own settings and run id (training "
        "options given here are ignored). A round the nodes already trained is answered "
        "from the reply they kept, not charged again."),
    insecure: bool = _INSECURE,
    root_certificates: Path | None = _ROOT_CERTIFICATES,
    flwr_home: Path | None = _FLWR_HOME,
    output_format: str = _OUTPUT_FORMAT,
    verbose: bool = _VERBOSE,
    engine: str = _ENGINE,
    physical_batch_size: int = _PHYSICAL_BATCH,
) -> None:
    """Start a federated run: simulated on this machine, or on a SuperLink."""
    setup_logging(verbose)
    try:
        config = resumed_config(resume) if resume is not None else build_run_config(
            rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
            learning_rate=learning_rate, epsilon=epsilon, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, private=not non_private, model=model,
            image_size=image_size, seed=seed, out=out, min_nodes=min_nodes,
            on_refusal=on_refusal, model_phase=model_phase,
            hospital_dp_noise=hospital_dp_noise, hospital_dp_clip=hospital_dp_clip,
            target_sensitivity=target_sensitivity, task=task, num_classes=num_classes,
            samples=samples, init_from=init_from, secure_aggregation=secure_aggregation,
            secagg_min_survivors=min_survivors, secagg_neighbours=secagg_neighbours,
            paradigm=paradigm,
            paradigm_options=paradigm_option, augment=augment,
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if superlink is None:
        if data_root is None:
            raise typer.BadParameter("give --data-root for a simulation, or --superlink ADDRESS")
        hospitals = len(site_dirs(data_root))
        if config.secure_aggregation != "off" and config.secagg_min_survivors > hospitals:
            raise typer.BadParameter(
                f"{config.secagg_min_survivors} survivors cannot be reached with {hospitals} "
                "hospitals; lower --min-survivors or add hospitals", param_hint="'--min-survivors'")
        doc = simulate(config, data_root, epsilon_cap=epsilon_cap, allow_non_private=non_private,
                       verbose=verbose, min_release_count=min_release_count,
                       ledger_root=ledger_dir, show_progress=output_format != "json",
                       engine=engine, physical_batch_size=physical_batch_size)
    else:
        doc = run_on_superlink(config, superlink, insecure=insecure,
                               root_certificates=root_certificates, flwr_home=flwr_home,
                               verbose=verbose, show_progress=output_format != "json")
    if output_format == "json":
        console.print_json(json.dumps(doc))
    else:
        print_report(doc)
        console.print(f"report: {Path(config.out_dir) / 'report.json'}")
    if doc.get("status") != "completed":
        raise typer.Exit(1)


def resumed_config(folder: Path) -> RunConfig:
    """The run config of the interrupted run in ``folder``, set to resume it there."""
    try:
        doc = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise typer.BadParameter(f"{folder} holds no readable report.json: give the output "
                                 "folder (--out) of the run to resume", param_hint="'--resume'"
                                 ) from None
    if doc.get("status") == "completed":
        raise typer.BadParameter(f"the run in {folder} already completed; nothing to resume",
                                 param_hint="'--resume'")
    if not (folder / "resume-state.json").is_file():
        raise typer.BadParameter(f"{folder} holds no resume-state.json (the run stopped before "
                                 "its first round was recorded): start it again instead",
                                 param_hint="'--resume'")
    config = RunConfig.from_user_config(doc.get("config", {}))
    from dataclasses import replace

    return replace(config, out_dir=str(folder), resume_from=str(folder))


@federation_app.command("certs")
def certs(
    out: Path = typer.Option(..., "--out", help="Folder for ca.crt, server.crt and their keys."),
    host: list[str] = typer.Option(["127.0.0.1", "localhost"], "--host",
                                   help="SuperLink host name or IP (repeat for several)."),
    valid_days: int = typer.Option(365, "--valid-days", min=1),
) -> None:
    """Make a private CA and a SuperLink TLS certificate (for pilots and tests)."""
    from common.crypto.certs import make_certificates

    paths = make_certificates(out, hosts=host, valid_days=valid_days)
    console.print(f"CA certificate (give to every node and operator): {paths.ca_cert}")
    console.print(f"SuperLink: --ssl-ca-certfile {paths.ca_cert} --ssl-certfile {paths.server_cert} "
                  f"--ssl-keyfile {paths.server_key}")


# --- vesalius federation cv ----------------------------------------------------------------------


def _ci(estimate: object) -> str:
    """``0.812 (0.751–0.873)`` from an Estimate dict, or '-' when undefined."""
    from cli.console import fmt

    if not isinstance(estimate, Mapping) or estimate.get("value") is None:
        return "-"
    lo, hi = estimate.get("lower"), estimate.get("upper")
    value = fmt(estimate["value"])
    return f"{value} ({fmt(lo)}–{fmt(hi)})" if lo is not None and hi is not None else value


def _eps_by_site(values: object) -> str:
    from cli.report_view import fmt_epsilon

    if not isinstance(values, Mapping) or not values:
        return "-"
    return ", ".join(f"{site} {'none' if eps is None else fmt_epsilon(eps, 2)}"
                     for site, eps in sorted(values.items()))


def _cv_metrics(task: str) -> list[tuple[str, str]]:
    """``(label, key)`` of the metrics a task's cross-validation rows hold."""
    if task == "binary":
        return [("AUC", "auc")]
    from server.cv_tasks import headline

    return [(m.name.replace("_", " "), m.name) for m in headline(task)]


def fold_line(row: Mapping[str, object], task: str = "binary") -> str:
    """One line per finished fold (printed while the cross-validation runs)."""
    issues = f"  [yellow]{row['issues']} issue(s)[/yellow]" if row.get("issues") else ""
    shown = "  ".join(f"{name} {_ci(row.get(key))}" for name, key in _cv_metrics(task))
    return (f"fold {row['fold']} (held out: {row['held_out']}): {shown}  "
            f"n={row.get('n', 0)}  ε so far {_eps_by_site(row.get('epsilon_by_site'))}{issues}")


def print_cv_report(doc: Mapping[str, Any]) -> None:
    """Per-fold table (AUC with 95% CI, n, each site's ε for the cross-validation so far,
    issues), the pooled line and each site's ε for the whole cross-validation."""
    from cli.console import fmt, table

    cv = doc["inference"]["cv"]
    task = str(cv.get("task") or "binary")
    shown = _cv_metrics(task) + ([("accuracy", "accuracy")] if task == "binary" else [])
    kind = "leave one site out" if cv["mode"] == "loso" else f"{cv['num_folds']}-fold"
    t = table(f"Cross-validation ({kind}): held-out patients, pooled over sites",
              ["fold", "held out", "n", *[f"{name} (95% CI)" for name, _ in shown],
               "ε so far per site", "issues"])
    details = {d["fold"]: d for d in cv.get("fold_details", [])}
    for row in cv["folds"]:
        detail = details.get(row["fold"], {})
        errors = detail.get("errors", [])
        issues = "; ".join(f"{e['site']} ({e['phase']}): {escape(str(e['reason']))}"
                           for e in errors[:2])
        if len(errors) > 2:
            issues += f"; +{len(errors) - 2} more"
        t.add_row(str(row["fold"]), str(row["held_out"]), str(row.get("n", 0)),
                  *[_ci(row.get(key)) for _, key in shown],
                  _eps_by_site(row.get("epsilon_by_site")),
                  issues or detail.get("reason") or "-")
    console.print(t)
    pooled = cv["pooled"]
    for name, key in _cv_metrics(task):
        spread = ""
        if pooled.get(f"{key}_mean") is not None:
            spread = (f"; fold {name} mean ± SD {fmt(pooled[f'{key}_mean'])} ± "
                      f"{fmt(pooled.get(f'{key}_sd'))}")
        console.print(f"[bold]Pooled over {len(pooled.get('folds_included', []))} folds: "
                      f"{name} {_ci(pooled.get(key))}, n={pooled.get('n', 0)}{spread}[/bold]")
    from server.report_tasks import cv_notes

    points = [(d.get("fold"), d.get("operating_point")) for d in cv.get("fold_details") or []]
    chosen = [(f, p) for f, p in points if isinstance(p, Mapping) and p.get("chosen_on")]
    if chosen:
        console.print("accuracy at each fold's threshold, chosen on its training hospitals' "
                      "validation patients: " + ", ".join(
                          f"fold {f} {float(p['threshold']):.4g}" for f, p in chosen), highlight=False)
    for note in cv_notes(cv):
        console.print(f"[dim]{note[0].upper()}{note[1:]}[/dim]", highlight=False)
    spent = {str(row.get("site")): row.get("epsilon") for row in doc.get("sites") or []}
    if spent and (doc.get("config") or {}).get("private", True) is not False:
        # every fold's training composed by each node: a patient trains in several folds
        console.print(f"ε for the whole cross-validation (patient level, RDP): "
                      f"{_eps_by_site(spent)}", highlight=False)
    if doc.get("status") != "completed":
        console.print(f"[red]cross-validation {doc.get('status')}: {doc.get('reason', '')}[/red]")


def simulate_cv(config: RunConfig, data_root: Path, *, folds: int, leave_one_site_out: bool,
                epsilon_cap: float, allow_non_private: bool, verbose: bool,
                min_release_count: int = 10, ledger_root: Path | None = None,
                show_progress: bool = True, engine: str | None = None,
                physical_batch_size: int = 0) -> dict[str, object]:
    """Cross-validate over the ``site-*`` folders of ``data_root`` in a simulation."""
    from server.cv import CVSpec, FoldEvent, simulate_cross_validation

    spec = CVSpec(num_folds=0 if leave_one_site_out else folds, leave_one_site_out=leave_one_site_out)
    ledgers = ledger_root if ledger_root is not None else default_ledger_root(data_root)
    nodes = simulated_hospitals(data_root, epsilon_cap=epsilon_cap,
                                allow_non_private=allow_non_private,
                                min_release_count=min_release_count, ledger_root=ledgers,
                                physical_batch_size=physical_batch_size)
    check_simulation(nodes, config, folds=0 if leave_one_site_out else folds)
    num_folds = len(nodes) if leave_one_site_out else folds
    rounds = config.plan.num_rounds
    console.print(f"cross-validating over {len(nodes)} simulated hospitals: "
                  f"{'leave one site out' if leave_one_site_out else f'{folds}-fold'}, "
                  f"{rounds} round(s) per fold "
                  f"({'DP-SGD, target ε=%g over all folds' % config.plan.target_epsilon if config.plan.private else 'non-private'})")
    announce_ledgers(ledgers)
    with run_view(rounds, num_folds, enabled=show_progress, verbose=verbose) as view:

        def progress(event: FoldEvent) -> None:
            if event.stage == "start":
                view.start_fold(event.fold)
            elif event.stage == "evaluated" and event.fold_row is not None:
                view.print(fold_line(event.fold_row, config.plan.task))

        result = simulate_cross_validation(config, nodes, spec, progress=progress, verbose=verbose,
                                           on_progress=view.on_progress, engine=engine)
    return result.to_dict()


@federation_app.command("cv")
def cv(
    folds: int = typer.Option(0, "--folds", min=0, help="k of a federated stratified k-fold (>= 2)."),
    leave_one_site_out: bool = typer.Option(False, "--leave-one-site-out",
                                            help="One fold per hospital instead of k-fold."),
    superlink: str | None = _SUPERLINK,
    data_root: Path | None = _DATA_ROOT,
    out: Path = typer.Option(Path("vesalius-cv"), "--out", callback=resolved, help="Where report.json, report.html and fold-*/ go."),
    rounds: int = typer.Option(5, "--rounds", min=1, help="Rounds per fold."),
    local_epochs: int = _LOCAL_EPOCHS,
    batch_size: int = _BATCH_SIZE,
    learning_rate: float = _LR,
    epsilon: float = typer.Option(8.0, "--epsilon", click_type=POSITIVE, help="Target patient-level ε per hospital for the whole cross-validation (all folds; > 0)."),
    noise_multiplier: float = _NOISE,
    max_grad_norm: float = _CLIP,
    non_private: bool = _NON_PRIVATE,
    model: str = _MODEL,
    image_size: int = _IMAGE_SIZE,
    seed: int = typer.Option(42, "--seed", help="Seed of the folds (at every node) and of each fold's initial model."),
    min_nodes: int = _MIN_NODES,
    epsilon_cap: float = _EPSILON_CAP,
    on_refusal: str = _ON_REFUSAL,
    min_release_count: int = _MIN_RELEASE,
    ledger_dir: Path | None = _LEDGER_DIR,
    target_sensitivity: float | None = _TARGET_SENSITIVITY,
    task: str = _TASK,
    num_classes: int | None = _NUM_CLASSES,
    samples: str | None = _SAMPLES,
    init_from: Path | None = _INIT_FROM,
    paradigm: str = _PARADIGM,
    paradigm_option: list[str] | None = _PARADIGM_OPTION,
    augment: str = _AUGMENT,
    insecure: bool = _INSECURE,
    root_certificates: Path | None = _ROOT_CERTIFICATES,
    flwr_home: Path | None = _FLWR_HOME,
    output_format: str = _OUTPUT_FORMAT,
    verbose: bool = _VERBOSE,
    engine: str = _ENGINE,
    physical_batch_size: int = _PHYSICAL_BATCH,
) -> None:
    """Federated cross-validation: k-fold (--folds K) or leave-one-site-out; a fresh model per fold."""
    setup_logging(verbose)
    if leave_one_site_out == (folds >= 2):
        raise typer.BadParameter("give either --folds K (K >= 2) or --leave-one-site-out")
    try:
        config = build_run_config(
            rounds=rounds, local_epochs=local_epochs, batch_size=batch_size,
            learning_rate=learning_rate, epsilon=epsilon, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, private=not non_private, model=model,
            image_size=image_size, seed=seed, out=out, min_nodes=min_nodes,
            on_refusal=on_refusal, target_sensitivity=target_sensitivity, task=task,
            num_classes=num_classes, samples=samples, init_from=init_from,
            paradigm=paradigm, paradigm_options=paradigm_option, cv=True, augment=augment,
        )
    except ConfigError as exc:
        raise typer.BadParameter(str(exc)) from None
    if superlink is None:
        if data_root is None:
            raise typer.BadParameter("give --data-root for a simulation, or --superlink ADDRESS")
        doc = simulate_cv(config, data_root, folds=folds, leave_one_site_out=leave_one_site_out,
                          epsilon_cap=epsilon_cap, allow_non_private=non_private, verbose=verbose,
                          min_release_count=min_release_count, ledger_root=ledger_dir,
                          show_progress=output_format != "json", engine=engine,
                          physical_batch_size=physical_batch_size)
    else:
        from server.cv import CVSpec

        extra = CVSpec(num_folds=0 if leave_one_site_out else folds,
                       leave_one_site_out=leave_one_site_out).to_user_config()
        doc = run_on_superlink(config, superlink, insecure=insecure,
                               root_certificates=root_certificates, flwr_home=flwr_home, extra=extra,
                               verbose=verbose, num_folds=max(folds, 1) if not leave_one_site_out else 1,
                               show_progress=output_format != "json")
        inference = doc.get("inference")
        if not isinstance(inference, dict) or "cv" not in inference:
            err_console.print("[red]error:[/red] the ServerApp wrote a plain run report, not a "
                              "cross-validation (does server/app.py dispatch on cv-folds?)")
            raise typer.Exit(1)
    if output_format == "json":
        console.print_json(json.dumps(doc))
    else:
        print_cv_report(doc)
        console.print(f"report: {Path(config.out_dir) / 'report.json'}")
        if doc.get("html"):
            console.print(f"HTML report: {doc['html']}")
    if doc.get("status") != "completed":
        raise typer.Exit(1)


@federation_app.command("paradigms")
def paradigms(output_format: str = _OUTPUT_FORMAT) -> None:
    """List the learning paradigms (--paradigm) and their options (--paradigm-option)."""
    from rich.table import Table

    from common.paradigms import list_paradigms

    rows = list_paradigms()
    if output_format == "json":
        console.print_json(json.dumps([{
            "name": p.name, "summary": p.summary, "cv": p.cv, "tasks": list(p.tasks),
            "options": [{"name": o.name, "type": o.kind.__name__, "default": o.default,
                         "help": o.help, "choices": list(o.choices)} for o in p.options],
        } for p in rows]))
        return
    table = Table(title="Learning paradigms (vesalius federation run --paradigm NAME)")
    for column in ("paradigm", "what it does", "federation cv", "options (-P KEY=VALUE)"):
        table.add_column(column)
    for p in rows:
        opts = "\n".join(f"{o.name}={o.default!r}: {o.help}" for o in p.options) or "-"
        table.add_row(p.name, p.summary, "yes" if p.cv else "no", opts)
    console.print(table)
