"""Typed configuration, parsed once at the edge from Flower's flat key/value configs.

* :class:`RunConfig` is the coordinator's run configuration (``[tool.flwr.app.config]`` in
  ``pyproject.toml``, overridable with ``flwr run --run-config``).
* :class:`TrainPlan` is the part of it a node receives in every train message; the node
  computes the privacy spend of the plan itself.
* :class:`NodeConfig` is the hospital's own configuration (``flower-supernode --node-config``).
  Its data directory and epsilon cap come only from the hospital; the coordinator cannot raise
  them.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from common import messages as k
from common.errors import ConfigError

Scalar = bool | int | float | str

CV_MODES = ("none", "kfold", "loso")
SAMPLE_KINDS = ("image-2d", "volume-3d", "series")
"""What one sample of a plan is (the values of :class:`common.tasks.base.SampleKind`)."""
SIMULATION_ENGINES = ("inprocess", "ray")
"""Engines of a simulated federation (:func:`server.simulation.simulate_apps`); the first is
the default: every hospital in the driver's process (:mod:`server.inprocess_engine`)."""
AUGMENT_LEVELS = ("none", "light", "strong", "auto")
"""Data augmentation at the node (:mod:`client.data.augment`; "auto": chosen per task and sample)."""
ON_REFUSAL = ("exclude", "stop")
SECURE_AGGREGATION_MODES = ("auto", "on", "off")  # common/secagg/params.py: MODES


def fold_run_id(base: str, fold: int) -> str:
    """The run id of fold ``fold`` of the cross-validation ``base`` (the coordinator names each
    fold's run so; a node composes a cross-validation's privacy from it, see
    :func:`cv_base_run_id`)."""
    return f"{base}-fold-{fold}"


def cv_base_run_id(run_id: str, fold: int) -> str | None:
    """The cross-validation id of fold ``fold``'s run id, or of one of its sub-runs
    (``<fold run>-member-<i>``, ``<fold run>-pretrain``: :func:`in_fold_run`), or None when
    it is neither (:func:`fold_run_id`'s inverse)."""
    mark = fold_run_id("", fold)
    at = run_id.rfind(mark)
    while at > 0:
        rest = run_id[at + len(mark):]
        if rest == "" or rest.startswith("-"):
            return run_id[:at]
        at = run_id.rfind(mark, 0, at)
    return None


def in_fold_run(run_id: str, base: str, fold: int) -> bool:
    """Whether ``run_id`` is fold ``fold``'s run of the cross-validation ``base`` or one of
    its sub-runs (paradigms run a fold's members or stages as ``<fold run>-<part>``)."""
    fold_run = fold_run_id(base, fold)
    return run_id == fold_run or run_id.startswith(fold_run + "-")


def _get(values: Mapping[str, Any], key: str, default: Any, kind: type) -> Any:
    raw = values.get(key, default)
    if kind is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in {"true", "false", "1", "0", "yes", "no"}:
            return raw.lower() in {"true", "1", "yes"}
        if isinstance(raw, int):
            return bool(raw)
        raise ConfigError(f"config key {key!r} must be a boolean, got {raw!r}")
    try:
        if kind is int and isinstance(raw, float) and not raw.is_integer():
            raise ValueError
        return kind(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"config key {key!r} must be {kind.__name__}, got {raw!r}") from None


@dataclass(frozen=True)
class TrainPlan:
    """What a node is asked to do for one run: sent in every train message.

    Parameters
    ----------
    num_rounds : int
        Planned federated rounds in the run (the node accounts the whole plan).
    local_epochs : int
        Local epochs per round.
    batch_size : int
        Expected Poisson batch size (sample rate = 1 / ceil(n / batch_size)).
    learning_rate : float
        SGD learning rate.
    private : bool
        Train with DP-SGD (Opacus). ``False`` only for baselines and benchmarks.
    target_epsilon : float
        Patient-level epsilon the whole plan may spend at this node; the noise multiplier is
        derived from it when ``noise_multiplier`` is 0.
    noise_multiplier : float
        Gaussian noise std / clipping norm; 0 means "derive from ``target_epsilon``".
    max_grad_norm : float
        Per-patient gradient clipping norm (L2).
    target_delta : float
        Delta of the guarantee; 0 means the node's default (well below 1 / patients).
    model : str
        Registered model name.
    image_size : int
        Side length, in pixels, images are resized to.
    seed : int
        Seed for sampling and initialisation.
    run_id : str
        Coordinator's identifier of the run (recorded in each node's privacy ledger).
    cv_mode : str
        "none", "kfold" (federated k-fold: every node holds out fold ``fold`` of
        ``num_folds`` stratified patient-level folds) or "loso" (leave-one-site-out: the
        node named ``holdout_site`` does not train and evaluates on all its patients).
    fold : int
        Held-out fold (k-fold) or fold number (LOSO), 0-based.
    num_folds : int
        Folds of the whole cross-validation; the node plans its budget for all of them.
    holdout_site : str
        LOSO only: site name of the held-out node.
    model_phase : str
        Training phase of models that have several (deep belief / Boltzmann machines):
        "" (the model's default), "finetune", "pretrain" or "pretrain:<layer>" (greedy
        layer-wise pretraining of one RBM of a DBN).
    task : str
        Learning task (:mod:`common.tasks`; the ones a federation trains are
        :data:`common.tasks.federated.FEDERATED_TASKS`).
    num_classes : int
        Classes of the task (labels ``0 .. num_classes - 1``); always 2 for "binary".
    samples : str
        What one sample is (:class:`common.tasks.base.SampleKind`): "image-2d" (one record
        per image), "volume-3d" (one study assembled into a cubic volume of side
        ``image_size``) or "series" (the same volume, read slice by slice by a recurrent
        model).
    paradigm : str
        Learning paradigm (:mod:`common.paradigms`): "supervised" (default) or a registered one.
    paradigm_options : str
        The paradigm's options as one canonical JSON text
        (:func:`common.paradigms.canonical_options`; "" = its defaults).
    augment : str
        Data augmentation of each training record at the node (:data:`AUGMENT_LEVELS`;
        :mod:`client.data.augment`).
    """

    num_rounds: int = 5
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.05
    private: bool = True
    target_epsilon: float = 8.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    target_delta: float = 0.0
    model: str = "cnn"
    image_size: int = 32
    seed: int = 42
    run_id: str = ""
    cv_mode: str = "none"
    fold: int = 0
    num_folds: int = 1
    holdout_site: str = ""
    model_phase: str = ""
    task: str = "binary"
    num_classes: int = 2
    samples: str = "image-2d"
    paradigm: str = "supervised"
    paradigm_options: str = ""
    augment: str = "none"

    def __post_init__(self) -> None:
        from common.paradigms import get_paradigm, read_options

        read_options(get_paradigm(self.paradigm), self.paradigm_options)  # refuses bad ones
        if self.augment not in AUGMENT_LEVELS:
            raise ConfigError(f"augment must be one of {', '.join(AUGMENT_LEVELS)}, "
                              f"got {self.augment!r}")
        if self.samples not in SAMPLE_KINDS:
            raise ConfigError(f"samples must be one of {', '.join(SAMPLE_KINDS)}, "
                              f"got {self.samples!r}")
        if not self.task:
            raise ConfigError("task must be a task name (e.g. 'binary')")
        if self.num_classes < 2:
            raise ConfigError(f"num-classes must be >= 2, got {self.num_classes}")
        if self.task == "binary" and self.num_classes != 2:
            raise ConfigError(f"the binary task has 2 classes, got num-classes={self.num_classes}")
        phase, _, layer = self.model_phase.partition(":")
        if phase not in ("", "finetune", "pretrain") or (layer and not layer.isdigit()):
            raise ConfigError(
                "model-phase must be '', 'finetune', 'pretrain' or 'pretrain:<layer>', "
                f"got {self.model_phase!r}"
            )
        if self.cv_mode not in CV_MODES:
            raise ConfigError(f"cv-mode must be one of {', '.join(CV_MODES)}, got {self.cv_mode!r}")
        if self.num_folds < 1 or not 0 <= self.fold < self.num_folds:
            raise ConfigError(
                f"fold must be in [0, num-folds) and num-folds >= 1, got fold={self.fold}, "
                f"num-folds={self.num_folds}"
            )
        if self.cv_mode == "kfold" and self.num_folds < 2:
            raise ConfigError("k-fold cross-validation needs num-folds >= 2")
        if self.cv_mode == "loso" and not self.holdout_site:
            raise ConfigError("leave-one-site-out needs holdout-site (a site name)")
        if self.num_rounds < 1 or self.local_epochs < 1 or self.batch_size < 1:
            raise ConfigError(
                "num-server-rounds, local-epochs and batch-size must be positive integers"
            )
        if not (self.learning_rate > 0 and math.isfinite(self.learning_rate)):
            raise ConfigError("learning-rate must be a positive number")
        for key, value in ((k.TARGET_EPSILON, self.target_epsilon),
                           (k.NOISE_MULTIPLIER, self.noise_multiplier),
                           (k.MAX_GRAD_NORM, self.max_grad_norm),
                           (k.TARGET_DELTA, self.target_delta)):
            if not math.isfinite(value):
                raise ConfigError(f"{key} must be a finite number, got {value}")
        if self.private:
            if self.noise_multiplier < 0:
                raise ConfigError("noise-multiplier must be >= 0 (0 = derive from target-epsilon)")
            if self.noise_multiplier == 0 and not self.target_epsilon > 0:
                raise ConfigError(
                    "a private run needs target-epsilon > 0 or an explicit noise-multiplier > 0"
                )
            if not self.max_grad_norm > 0:
                raise ConfigError("max-grad-norm must be > 0 for a private run")
            if not 0 <= self.target_delta < 1:
                raise ConfigError("target-delta must be in [0, 1) (0 = node default)")
        if self.image_size < 8:
            raise ConfigError("image-size must be at least 8 pixels")

    _KEYS = {
        "num_rounds": k.NUM_ROUNDS,
        "local_epochs": k.LOCAL_EPOCHS,
        "batch_size": k.BATCH_SIZE,
        "learning_rate": k.LEARNING_RATE,
        "private": k.PRIVATE,
        "target_epsilon": k.TARGET_EPSILON,
        "noise_multiplier": k.NOISE_MULTIPLIER,
        "max_grad_norm": k.MAX_GRAD_NORM,
        "target_delta": k.TARGET_DELTA,
        "model": k.MODEL,
        "image_size": k.IMAGE_SIZE,
        "seed": k.SEED,
        "run_id": k.RUN_ID,
        "cv_mode": k.CV_MODE,
        "fold": k.FOLD,
        "num_folds": k.NUM_FOLDS,
        "holdout_site": k.HOLDOUT_SITE,
        "model_phase": k.MODEL_PHASE,
        "task": k.TASK,
        "num_classes": k.NUM_CLASSES,
        "samples": k.SAMPLES,
        "paradigm": k.PARADIGM,
        "paradigm_options": k.PARADIGM_OPTIONS,
        "augment": k.AUGMENT,
    }

    @classmethod
    def from_record(cls, values: Mapping[str, Any]) -> TrainPlan:
        """Parse from a flat mapping (a ConfigRecord or Flower run_config)."""
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            key = cls._KEYS[f.name]
            default = getattr(cls, f.name)
            kwargs[f.name] = _get(values, key, default, type(default))
        return cls(**kwargs)

    def to_record(self) -> dict[str, Scalar]:
        """Flatten to wire keys (for a ConfigRecord)."""
        return {self._KEYS[name]: value for name, value in asdict(self).items()}


@dataclass(frozen=True)
class RunConfig:
    """The coordinator's configuration for one run.

    Parameters
    ----------
    plan : TrainPlan
        What every node is asked to train.
    fraction_train, fraction_evaluate : float
        Fractions of connected nodes sampled per round.
    min_nodes : int
        Minimum nodes that must be connected before a round starts.
    out_dir : str
        Where checkpoints, ``report.json`` and the summary are written.
    round_timeout : float
        Seconds to wait for replies in a round.
    on_refusal : str
        What the coordinator does when a node refuses a plan for budget or policy reasons:
        "exclude" the node from the rest of the run (default) or "stop" the run. Either way
        the report says which node refused and why.
    hospital_dp_noise : float
        Hospital-level (client-level) DP on top of the nodes' patient-level DP: Gaussian noise
        multiplier on the sum of clipped model updates (0 = off; see
        :mod:`server.strategies.hospital_dp`).
    hospital_dp_clip : float
        L2 bound of each hospital's model update when hospital-level DP is on.
    hospital_dp_delta : float
        Delta at which hospital-level epsilon is reported.
    target_sensitivity : float
        Operating point of the final model's test metrics, chosen on the validation
        patients: 0 means Youden's J; a value in (0, 1] the highest threshold whose
        validation sensitivity reaches it (:mod:`common.stats.operating_point`).
    init_from : str
        A checkpoint (``torch.save`` of a state dict, e.g. an earlier run's
        ``checkpoints/final.pt``) whose tensors of matching name and shape initialise the
        global model (:func:`server.app.initial_arrays`); "" starts from the seed.
    resume_from : str
        Output folder of an interrupted run (its ``--out``): the run continues from its last
        aggregated round's checkpoint, with the same run id, writing to that folder
        (:mod:`server.resume`); "" starts a new run.
    secure_aggregation : str
        "auto" (on when at least 3 nodes take part), "on" or "off": the coordinator sees only
        the sum of the nodes' updates, counts and score histograms (:mod:`common.secagg`).
    secagg_min_survivors : int
        Fewest nodes a secure-aggregation round may end with (0 = default,
        :func:`common.secagg.params.default_min_survivors`); below it the round is abandoned.
    secagg_neighbours : int
        Peers each hospital shares its secrets with (0 = default: all up to 40 hospitals, 40
        beyond, SecAgg+; :func:`common.secagg.params.neighbour_count`); at least the number
        of hospitals gives full sharing at any size.
    """

    plan: TrainPlan = TrainPlan()
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_nodes: int = 2
    out_dir: str = "vesalius-out"
    round_timeout: float = 600.0
    on_refusal: str = "exclude"
    hospital_dp_noise: float = 0.0
    hospital_dp_clip: float = 0.0
    hospital_dp_delta: float = 1e-3
    target_sensitivity: float = 0.0
    init_from: str = ""
    resume_from: str = ""
    secure_aggregation: str = "auto"
    secagg_min_survivors: int = 0
    secagg_neighbours: int = 0

    def __post_init__(self) -> None:
        if self.secure_aggregation not in SECURE_AGGREGATION_MODES:
            raise ConfigError("secure-aggregation must be one of "
                              f"{', '.join(SECURE_AGGREGATION_MODES)}, got {self.secure_aggregation!r}")
        if self.secagg_min_survivors == 1 or self.secagg_min_survivors < 0:
            raise ConfigError("secagg-min-survivors must be 0 (default) or at least 2: one "
                              "survivor's 'sum' is its own update")
        if self.secagg_neighbours == 1 or self.secagg_neighbours < 0:
            raise ConfigError("secagg-neighbours must be 0 (default) or at least 2")
        if not (math.isfinite(self.target_sensitivity) and 0 <= self.target_sensitivity <= 1):
            raise ConfigError("target-sensitivity must lie in (0, 1], or be 0 for Youden's J, "
                              f"got {self.target_sensitivity}")
        if not (math.isfinite(self.hospital_dp_noise) and self.hospital_dp_noise >= 0):
            raise ConfigError("hospital-dp-noise must be a finite number >= 0 (0 = off)")
        if self.hospital_dp_noise > 0 and not (
            math.isfinite(self.hospital_dp_clip) and self.hospital_dp_clip > 0
        ):
            raise ConfigError("hospital-level DP needs hospital-dp-clip > 0 (L2 bound of an update)")
        if not 0 < self.hospital_dp_delta < 1:
            raise ConfigError("hospital-dp-delta must lie in (0, 1)")
        if self.on_refusal not in ON_REFUSAL:
            raise ConfigError(f"on-refusal must be one of {', '.join(ON_REFUSAL)}, got {self.on_refusal!r}")
        for name in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise ConfigError(f"{name.replace('_', '-')} must be in (0, 1], got {value}")
        if self.min_nodes < 1:
            raise ConfigError("min-nodes must be >= 1")

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any]) -> RunConfig:
        """Parse Flower's ``context.run_config`` (defaults for absent keys)."""
        return cls(
            plan=TrainPlan.from_record(values),
            fraction_train=_get(values, k.FRACTION_TRAIN, 1.0, float),
            fraction_evaluate=_get(values, k.FRACTION_EVALUATE, 1.0, float),
            min_nodes=_get(values, k.MIN_NODES, 2, int),
            out_dir=_get(values, k.OUT_DIR, "vesalius-out", str),
            round_timeout=_get(values, k.ROUND_TIMEOUT, 600.0, float),
            on_refusal=_get(values, k.ON_REFUSAL, "exclude", str),
            hospital_dp_noise=_get(values, k.HOSPITAL_DP_NOISE, 0.0, float),
            hospital_dp_clip=_get(values, k.HOSPITAL_DP_CLIP, 0.0, float),
            hospital_dp_delta=_get(values, k.HOSPITAL_DP_DELTA, 1e-3, float),
            target_sensitivity=_get(values, k.TARGET_SENSITIVITY, 0.0, float),
            init_from=_get(values, k.INIT_FROM, "", str),
            resume_from=_get(values, k.RESUME_FROM, "", str),
            secure_aggregation=_get(values, k.SECURE_AGGREGATION, "auto", str),
            secagg_min_survivors=_get(values, k.SECAGG_MIN_SURVIVORS, 0, int),
            secagg_neighbours=_get(values, k.SECAGG_NEIGHBOURS, 0, int),
        )

    def to_dict(self) -> dict[str, Scalar]:
        """Flat kebab-case view for reports."""
        out: dict[str, Scalar] = dict(self.plan.to_record())
        out.update(
            {
                k.FRACTION_TRAIN: self.fraction_train,
                k.FRACTION_EVALUATE: self.fraction_evaluate,
                k.MIN_NODES: self.min_nodes,
                k.OUT_DIR: self.out_dir,
                k.ROUND_TIMEOUT: self.round_timeout,
                k.ON_REFUSAL: self.on_refusal,
                k.HOSPITAL_DP_NOISE: self.hospital_dp_noise,
                k.HOSPITAL_DP_CLIP: self.hospital_dp_clip,
                k.HOSPITAL_DP_DELTA: self.hospital_dp_delta,
                k.TARGET_SENSITIVITY: self.target_sensitivity,
                k.INIT_FROM: self.init_from,
                k.RESUME_FROM: self.resume_from,
                k.SECURE_AGGREGATION: self.secure_aggregation,
                k.SECAGG_MIN_SURVIVORS: self.secagg_min_survivors,
                k.SECAGG_NEIGHBOURS: self.secagg_neighbours,
            }
        )
        return out


@dataclass(frozen=True)
class NodeConfig:
    """A hospital node's own settings (``flower-supernode --node-config``).

    Parameters
    ----------
    data_dir : Path
        Folder with the node's DICOM files and ``labels.csv``.
    epsilon_cap : float
        Largest patient-level epsilon this node lets one run's plan spend.
    site_name : str
        Name the node reports in metrics (no patient information).
    require_deidentified : bool
        Skip DICOM files that carry direct identifiers.
    allow_non_private : bool
        Accept non-private training plans (baselines only; off by default).
    device : str
        "auto" (CUDA when available), "cpu" or "cuda".
    torch_threads : int
        Intra-op threads for torch on CPU (0 = torch's default). Small models train fastest
        single-threaded (measured: ~10x faster than 2 threads on 2 cores, bench/RESULTS.md).
    release_histograms : bool
        Release per-class score histograms of held-out patients when asked (off by default:
        with a crafted model, fine histograms can reveal one value per patient; they are not
        yet noised).
    max_image_size : int
        Largest image side a plan may ask for (bounds the memory a message can make the
        node use).
    ledger_dir : Path or None
        Folder of the node's privacy ledger and signing key (``ledger.jsonl``,
        ``node-key.pem``), outside the app directory. ``None`` means
        ``$VESALIUS_HOME/ledger`` (default ``~/.vesalius/ledger``).
    min_release_count : int
        Counts a statistics release would carry that are below this number are suppressed
        unless the release is noised (``stats_noise_multiplier > 0``).
    stats_noise_multiplier : float
        Gaussian noise on released statistics, as a multiple of their L2 sensitivity; 0 means
        no noise (small-count suppression applies). Noised releases are charged to the ledger.
    tabular_path : Path or None
        Optional CSV of the hospital's clinical covariates (one row per patient) for
        federated regression queries; ``None`` when the node serves images only.
    physical_batch_size : int
        Largest number of samples one forward and backward pass of DP training holds. 0
        (default) is automatic: volumes run in parts of half the plan's batch size, 2D images
        as whole Poisson batches. A Poisson batch exceeds the plan's batch size by a few
        standard deviations; this bounds the memory of its activations (a GPU's, for large
        images), at some cost in time. The step, its clipping, noise and ε are the same.
    """

    data_dir: Path
    epsilon_cap: float = 10.0
    site_name: str = "site"
    require_deidentified: bool = True
    allow_non_private: bool = False
    device: str = "auto"
    torch_threads: int = 1
    release_histograms: bool = False
    max_image_size: int = 256
    ledger_dir: Path | None = None
    min_release_count: int = 10
    stats_noise_multiplier: float = 0.0
    tabular_path: Path | None = None
    physical_batch_size: int = 0

    def __post_init__(self) -> None:
        if not self.epsilon_cap > 0:
            raise ConfigError("epsilon-cap must be > 0")
        if self.device not in {"auto", "cpu", "cuda"}:
            raise ConfigError("device must be one of auto, cpu, cuda")
        if self.torch_threads < 0:
            raise ConfigError("torch-threads must be >= 0 (0 = torch default)")
        if self.max_image_size < 8:
            raise ConfigError("max-image-size must be at least 8 pixels")
        if self.min_release_count < 0:
            raise ConfigError("min-release-count must be >= 0")
        if not (math.isfinite(self.stats_noise_multiplier) and self.stats_noise_multiplier >= 0):
            raise ConfigError("stats-noise-multiplier must be a finite number >= 0")
        if self.physical_batch_size < 0:
            raise ConfigError("physical-batch-size must be >= 0 (0 = automatic)")

    @property
    def ledger_path(self) -> Path:
        """The node's ledger file (see ``ledger_dir``)."""
        return self.resolved_ledger_dir / "ledger.jsonl"

    @property
    def resolved_ledger_dir(self) -> Path:
        """``ledger_dir``, or ``$VESALIUS_HOME/ledger`` (default ``~/.vesalius/ledger``)."""
        if self.ledger_dir is not None:
            return self.ledger_dir
        home = os.environ.get("VESALIUS_HOME")
        return (Path(home) if home else Path.home() / ".vesalius").expanduser() / "ledger"

    @classmethod
    def from_user_config(cls, values: Mapping[str, Any]) -> NodeConfig:
        """Parse Flower's ``context.node_config``; ``data-dir`` is required."""
        if k.NODE_DATA_DIR not in values:
            raise ConfigError(
                "node config lacks 'data-dir': start the node with "
                "--node-config \"data-dir='/path/to/dicom' epsilon-cap=8\"",
                safe_reason="node is not configured: 'data-dir' missing in its node config",
            )
        return cls(
            data_dir=Path(str(values[k.NODE_DATA_DIR])).expanduser(),
            epsilon_cap=_get(values, k.NODE_EPSILON_CAP, 10.0, float),
            site_name=_get(values, k.NODE_SITE_NAME, "site", str),
            require_deidentified=_get(values, k.NODE_REQUIRE_DEIDENTIFIED, True, bool),
            allow_non_private=_get(values, k.NODE_ALLOW_NON_PRIVATE, False, bool),
            device=_get(values, k.NODE_DEVICE, "auto", str),
            torch_threads=_get(values, k.NODE_TORCH_THREADS, 1, int),
            release_histograms=_get(values, k.NODE_RELEASE_HISTOGRAMS, False, bool),
            max_image_size=_get(values, k.NODE_MAX_IMAGE_SIZE, 256, int),
            ledger_dir=(
                Path(str(values[k.NODE_LEDGER_DIR])).expanduser()
                if k.NODE_LEDGER_DIR in values
                else None
            ),
            min_release_count=_get(values, k.NODE_MIN_RELEASE_COUNT, 10, int),
            stats_noise_multiplier=_get(values, k.NODE_STATS_NOISE, 0.0, float),
            tabular_path=(
                Path(str(values[k.NODE_TABULAR_PATH])).expanduser()
                if k.NODE_TABULAR_PATH in values
                else None
            ),
            physical_batch_size=_get(values, k.NODE_PHYSICAL_BATCH, 0, int),
        )
