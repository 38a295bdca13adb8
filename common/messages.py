"""The wire schema: every record, metric and config key that crosses the network.

Nothing else in the code base spells these strings. Keys are kebab-case like Flower's own
(``num-examples``, ``server-round``).
"""

from __future__ import annotations

from typing import Final

# --- RecordDict keys ------------------------------------------------------------------------
ARRAYS: Final = "arrays"  # ArrayRecord: model state dict
CONFIG: Final = "config"  # ConfigRecord: instructions from the coordinator
METRICS: Final = "metrics"  # MetricRecord: numbers a node releases
NODE_INFO: Final = "node-info"  # ConfigRecord: non-identifying node description (site name)

# --- Node-local state (Context.state, never sent) -------------------------------------------
STATE_PRIVACY: Final = "privacy-accountant"  # ConfigRecord with the accountant history

# --- ConfigRecord keys sent by the coordinator ----------------------------------------------
SERVER_ROUND: Final = "server-round"  # injected by Flower's strategies
NUM_ROUNDS: Final = "num-server-rounds"
LOCAL_EPOCHS: Final = "local-epochs"
BATCH_SIZE: Final = "batch-size"
LEARNING_RATE: Final = "learning-rate"
PRIVATE: Final = "private"
TARGET_EPSILON: Final = "target-epsilon"
NOISE_MULTIPLIER: Final = "noise-multiplier"
MAX_GRAD_NORM: Final = "max-grad-norm"
TARGET_DELTA: Final = "target-delta"
MODEL: Final = "model"
IMAGE_SIZE: Final = "image-size"
SEED: Final = "seed"
SPLIT: Final = "split"  # evaluate: which held-out split ("val" or "test")
RUN_ID: Final = "run-id"  # coordinator's run identifier (node ledgers record it)
CV_MODE: Final = "cv-mode"  # "none" | "kfold" | "loso"
FOLD: Final = "fold"
NUM_FOLDS: Final = "num-folds"
HOLDOUT_SITE: Final = "holdout-site"
WITH_HISTOGRAMS: Final = "with-histograms"  # evaluate: also release per-class score histograms

SPLIT_VAL: Final = "val"
SPLIT_TEST: Final = "test"

# --- MetricRecord keys released by nodes ----------------------------------------------------
NUM_EXAMPLES: Final = "num-examples"  # Flower's FedAvg weighting key
TRAIN_LOSS: Final = "train-loss"
EPSILON: Final = "epsilon"
DELTA: Final = "delta"
SAMPLE_RATE: Final = "sample-rate"
STEPS: Final = "steps"
LOSS: Final = "loss"
ACCURACY: Final = "accuracy"
AUC: Final = "auc"
HIST_POSITIVE: Final = "hist-positive"  # counts of positive-class scores per fixed bin
HIST_NEGATIVE: Final = "hist-negative"  # counts of negative-class scores per fixed bin
AUC_POOLED: Final = "auc-pooled"  # coordinator-side: AUC of the pooled histograms

# --- NODE_INFO keys -------------------------------------------------------------------------
SITE: Final = "site"

# Keys that carry one number per node, never averaged across nodes by the coordinator.
PER_NODE_METRICS: Final = frozenset({EPSILON, DELTA, SAMPLE_RATE, STEPS, NOISE_MULTIPLIER})
HISTOGRAM_METRICS: Final = frozenset({HIST_POSITIVE, HIST_NEGATIVE})

# --- Coordinator-only run-config keys (``[tool.flwr.app.config]``) ------------------------------
FRACTION_TRAIN: Final = "fraction-train"
FRACTION_EVALUATE: Final = "fraction-evaluate"
MIN_NODES: Final = "min-nodes"
OUT_DIR: Final = "out-dir"
ROUND_TIMEOUT: Final = "round-timeout"
ON_REFUSAL: Final = "on-refusal"  # "exclude" | "stop": when a node refuses a plan

# --- Node-config keys (``flower-supernode --node-config``; set by the hospital only) -----------
NODE_DATA_DIR: Final = "data-dir"
NODE_EPSILON_CAP: Final = "epsilon-cap"
NODE_SITE_NAME: Final = "site-name"
NODE_REQUIRE_DEIDENTIFIED: Final = "require-deidentified"
NODE_ALLOW_NON_PRIVATE: Final = "allow-non-private"
NODE_DEVICE: Final = "device"
NODE_TORCH_THREADS: Final = "torch-threads"
NODE_RELEASE_HISTOGRAMS: Final = "release-histograms"
NODE_MAX_IMAGE_SIZE: Final = "max-image-size"
NODE_LEDGER_DIR: Final = "ledger-dir"
NODE_MIN_RELEASE_COUNT: Final = "min-release-count"
NODE_STATS_NOISE: Final = "stats-noise-multiplier"
NODE_TABULAR_PATH: Final = "tabular-path"
PARTITION_ID: Final = "partition-id"  # set by Flower's simulation runtime
