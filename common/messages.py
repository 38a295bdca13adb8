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
MODEL_PHASE: Final = "model-phase"  # "", "finetune", "pretrain" or "pretrain:<layer>" (DBN/DBM)
WITH_HISTOGRAMS: Final = "with-histograms"  # evaluate: also release per-class score histograms
TASK: Final = "task"  # learning task (common/tasks/federated.py: FEDERATED_TASKS)
NUM_CLASSES: Final = "num-classes"  # classes of a multi-class task (2 for binary)
SAMPLES: Final = "samples"  # what a sample is: image-2d, volume-3d, series (common/config.py)
PARADIGM: Final = "paradigm"  # learning paradigm (common/paradigms: "supervised", ...)
PARADIGM_OPTIONS: Final = "paradigm-options"  # its options, one canonical JSON text
AUGMENT: Final = "augment"  # data augmentation at the node: none, light, strong, auto

SPLIT_VAL: Final = "val"
SPLIT_TEST: Final = "test"
SPLIT_TRAIN: Final = "train"  # queries that fit on training patients (elm-readout)

# --- MetricRecord keys released by nodes ----------------------------------------------------
NUM_EXAMPLES: Final = "num-examples"  # Flower's FedAvg weighting key
UNIT_WEIGHT: Final = "unit-weight"  # 1 per training node: equal weights (hospital-level DP)
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
EPSILON_PRV: Final = "epsilon-prv"  # run epsilon with the PRV accountant (RDP is EPSILON)
EPSILON_DATASET: Final = "epsilon-dataset"  # dataset's total over all runs (node ledger, RDP)
EPSILON_CAP: Final = "epsilon-cap"  # the node's per-dataset cap
# a cross-validation's epsilon so far at a node: every fold's training, composed (RDP, PRV)
EPSILON_CV: Final = "epsilon-cv"
EPSILON_CV_PRV: Final = "epsilon-cv-prv"
AUC_POOLED: Final = "auc-pooled"  # coordinator-side: AUC of the pooled histograms

# --- Error codes of node replies (above Flower's own 0-8) ------------------------------------
ERROR_CODE_REFUSED: Final = 100  # the node refused the request (budget, consent, policy)
ERROR_CODE_NODE: Final = 101  # the node failed to serve the request (data, model, ...)

# --- NODE_INFO keys -------------------------------------------------------------------------
SITE: Final = "site"
LEDGER_HEAD: Final = "ledger-head"  # "INDEX:HASH" of the node's last ledger entry (an anchor)

# Keys that carry one number per node, never averaged across nodes by the coordinator.
PER_NODE_METRICS: Final = frozenset(
    {EPSILON, EPSILON_PRV, EPSILON_DATASET, EPSILON_CAP, EPSILON_CV, EPSILON_CV_PRV, DELTA,
     SAMPLE_RATE, STEPS, NOISE_MULTIPLIER, UNIT_WEIGHT}
)
HISTOGRAM_METRICS: Final = frozenset({HIST_POSITIVE, HIST_NEGATIVE})

# --- Coordinator-only run-config keys (``[tool.flwr.app.config]``) ------------------------------
FRACTION_TRAIN: Final = "fraction-train"
FRACTION_EVALUATE: Final = "fraction-evaluate"
MIN_NODES: Final = "min-nodes"
OUT_DIR: Final = "out-dir"
ROUND_TIMEOUT: Final = "round-timeout"
TARGET_SENSITIVITY: Final = "target-sensitivity"  # operating point: 0 = Youden's J
INIT_FROM: Final = "init-from"  # checkpoint initialising the global model ("" = seed)
RESUME_FROM: Final = "resume-from"  # output folder of an interrupted run to continue ("" = new run)
HOSPITAL_DP_NOISE: Final = "hospital-dp-noise"  # client-level DP noise multiplier (0 = off)
HOSPITAL_DP_CLIP: Final = "hospital-dp-clip"  # client-level DP: L2 bound of a model update
HOSPITAL_DP_DELTA: Final = "hospital-dp-delta"  # client-level DP: delta of the report
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
NODE_PHYSICAL_BATCH: Final = "physical-batch-size"
PARTITION_ID: Final = "partition-id"  # set by Flower's simulation runtime

# --- Cross-validation (server/cv.py, client/data/folds.py) -------------------------------------
SPLIT_HELDOUT: Final = "heldout"  # evaluate/query split: the plan's held-out CV part (folds.py)
CV_FOLDS: Final = "cv-folds"  # run config: k of a federated k-fold CV (0 = no CV)
CV_LEAVE_ONE_SITE_OUT: Final = "cv-leave-one-site-out"  # run config: leave-one-site-out CV

# --- Statistics queries (issue 5: node-side sums, coordinator-side pooling) --------------------
# Coordinator -> node (ConfigRecord CONFIG of a QUERY message)
QUERY: Final = "query"  # registered query name: metrics, placements, mcnemar, conformal, ...
THRESHOLD: Final = "threshold"  # decision threshold on the positive-class score
CALIBRATION_BINS: Final = "calibration-bins"  # equal-width calibration bins on [0, 1]
VALUE_BINS: Final = "value-bins"  # bins of entropy / nonconformity histograms
MC_SAMPLES: Final = "mc-samples"  # entropy: MC-dropout passes (1 model) per patient
CONFORMAL_QHAT: Final = "conformal-qhat"  # conformal: nonconformity threshold to test coverage
COLUMNS: Final = "columns"  # logistic: covariate names (node allow-list)
BETA: Final = "beta"  # logistic: current coefficients (intercept first)
# Coordinator -> node (other records of a QUERY message)
ARRAYS_B: Final = "arrays-b"  # ArrayRecord: second model (paired DeLong, McNemar)
ENSEMBLE_PREFIX: Final = "member-"  # ArrayRecords member-0, member-1, ...: deep ensemble
POOLED: Final = "pooled"  # MetricRecord: pooled histograms sent back for pass 2
HIST_POSITIVE_B: Final = "hist-positive-b"  # second model's per-class histograms
HIST_NEGATIVE_B: Final = "hist-negative-b"
# Node -> coordinator (MetricRecord METRICS of a QUERY reply; all sums over patients)
NUM_POSITIVE: Final = "num-positive"
NUM_NEGATIVE: Final = "num-negative"
TP: Final = "tp"
FP: Final = "fp"
TN: Final = "tn"
FN: Final = "fn"
CAL_COUNT: Final = "cal-count"  # per calibration bin: patients
CAL_SCORE_SUM: Final = "cal-score-sum"  # per calibration bin: sum of scores
CAL_LABEL_SUM: Final = "cal-label-sum"  # per calibration bin: sum of labels
BRIER_SUM: Final = "brier-sum"  # sum of (score - label)^2
LOGLIK: Final = "loglik"  # sum of log-likelihoods (binary; logistic: at beta)
V10_SUM: Final = "v10-sum"  # DeLong placements of positives, per model
V10_CROSS: Final = "v10-cross"  # sums of products of positives' placements (models x models)
V01_SUM: Final = "v01-sum"
V01_CROSS: Final = "v01-cross"
SITE_V10_CROSS: Final = "site-v10-cross"  # as above, against the node's own histograms
SITE_V01_CROSS: Final = "site-v01-cross"
BOTH_CORRECT: Final = "both-correct"  # McNemar table
ONLY_A_CORRECT: Final = "only-a-correct"  # b
ONLY_B_CORRECT: Final = "only-b-correct"  # c
BOTH_WRONG: Final = "both-wrong"
NONCONFORMITY_HIST: Final = "nonconformity-hist"
COVERED: Final = "covered"  # patients whose true label lies in the conformal set
SET_SIZE_COUNTS: Final = "set-size-counts"  # patients whose conformal set has 0, 1, 2 classes
ENTROPY_SUM: Final = "entropy-sum"
ENTROPY_SQ_SUM: Final = "entropy-sq-sum"
ENTROPY_HIST: Final = "entropy-hist"
GRAD: Final = "grad"
HESSIAN: Final = "hessian"
NOISED: Final = "noised"  # 1 when the node added Gaussian noise (ledger-charged)
SUPPRESSED_CELLS: Final = "suppressed-cells"  # cells released as 0 (small-count rule)

# --- Multi-class pooled inference (client/queries/multiclass.py, server/inference_multiclass.py)
# Node -> coordinator; K = num-classes, B = fine score bins; arrays flattened row-major.
CONFUSION: Final = "confusion"  # K x K patients by (true class, arg-max class)
OVR_HIST_POSITIVE: Final = "ovr-hist-positive"  # K x B: class k's score of class-k patients
OVR_HIST_NEGATIVE: Final = "ovr-hist-negative"  # K x B: class k's score of the other patients
OVR_NUM_POSITIVE: Final = "ovr-num-positive"  # K: patients of each class
OVR_NUM_NEGATIVE: Final = "ovr-num-negative"  # K: patients of the other classes
OVR_V10_SUM: Final = "ovr-v10-sum"  # K: DeLong placement sums of each class's positives
OVR_V10_SQ: Final = "ovr-v10-sq"  # K: sums of their squares
OVR_V01_SUM: Final = "ovr-v01-sum"  # K: placement sums of each class's negatives
OVR_V01_SQ: Final = "ovr-v01-sq"
OVR_CROSS: Final = "ovr-cross"  # K x K: cross-products of scaled placements (macro AUC CI)

# --- DC-ELM closed-form readout (client/queries/elm.py, server/inference.py) -------------------
ELM_CLIP: Final = "elm-clip"  # per-patient L2 bound of the feature rows
ELM_HTH: Final = "elm-hth"  # sum of H^T H over the node's training patients ([d, d])
ELM_HTY: Final = "elm-hty"  # sum of H^T Y ([d, k])

# ordinal / multilabel queries (client/queries/ordinal.py, multilabel.py)
# ordinal-metrics releases NUM_EXAMPLES and CONFUSION (K x K: true grade x predicted grade).
# multilabel-*: K = num-classes findings, B = fine score bins; arrays flattened row-major.
LABEL_CONFUSION: Final = "label-confusion"  # K x 4: per finding tp, fp, fn, tn at 0.5
LABEL_HIST_POSITIVE: Final = "label-hist-positive"  # K x B: finding k's score, its positives
LABEL_HIST_NEGATIVE: Final = "label-hist-negative"  # K x B: finding k's score, its negatives
LABEL_NUM_POSITIVE: Final = "label-num-positive"  # K: patients positive for each finding
LABEL_NUM_NEGATIVE: Final = "label-num-negative"  # K: patients negative for each finding
LABEL_V10_SUM: Final = "label-v10-sum"  # K: DeLong placement sums of each finding's positives
LABEL_V10_SQ: Final = "label-v10-sq"  # K: sums of their squares
LABEL_V01_SUM: Final = "label-v01-sum"  # K: placement sums of each finding's negatives
LABEL_V01_SQ: Final = "label-v01-sq"
LABEL_CROSS: Final = "label-cross"  # K x K: cross-products of scaled placements (macro AUC CI)

# regression / segmentation queries (client/queries/regression.py, segmentation.py)
# Coordinator -> node (config record of regression-metrics / segmentation-metrics)
VALUE_LOWER: Final = "value-lower"  # regression: lower clip of targets and predictions (target units)
VALUE_UPPER: Final = "value-upper"  # regression: upper clip of targets and predictions (target units)
ABS_ERROR_BINS: Final = "abs-error-bins"  # regression: |error| bins over [0, upper - lower]
SLICE_SPACING: Final = "slice-spacing"  # segmentation: slice distance, in-plane pixels (HD95)
# Node -> coordinator (sums over held-out patients; clipped values)
REG_SUM_Y: Final = "reg-sum-y"  # sum of targets
REG_SUM_PRED: Final = "reg-sum-pred"  # sum of predictions
REG_SUM_Y2: Final = "reg-sum-y2"  # sum of squared targets
REG_SUM_PRED2: Final = "reg-sum-pred2"  # sum of squared predictions
REG_SUM_Y_PRED: Final = "reg-sum-y-pred"  # sum of target x prediction
REG_SUM_ABS_ERROR: Final = "reg-sum-abs-error"  # sum of |prediction - target|
REG_SUM_SQ_ERROR: Final = "reg-sum-sq-error"  # sum of (prediction - target)^2
REG_SUM_ERROR: Final = "reg-sum-error"  # sum of prediction - target (Bland-Altman bias)
REG_ABS_ERROR_HIST: Final = "reg-abs-error-hist"  # patients per |error| bin (small cells)
SEG_SUM_DICE: Final = "seg-sum-dice"  # sum of per-patient Dice
SEG_SUM_DICE_SQ: Final = "seg-sum-dice-sq"  # sum of squared Dice
SEG_NUM_HD95: Final = "seg-num-hd95"  # patients with a defined HD95
SEG_SUM_HD95: Final = "seg-sum-hd95"  # sum of HD95 (clipped to the image diagonal, pixels)
SEG_SUM_HD95_SQ: Final = "seg-sum-hd95-sq"  # sum of squared HD95
SEG_EMPTY_BOTH: Final = "seg-empty-both"  # patients with both masks empty (small cells)
SEG_EMPTY_ONE: Final = "seg-empty-one"  # patients with exactly one mask empty (small cells)

# evaluate replies: one task metric per task without accuracy/AUC (client/training/evaluate.py)
EVAL_DICE: Final = "dice"  # segmentation: mean per-patient foreground Dice
EVAL_MAE: Final = "mae"  # regression: mean absolute error per patient
EVAL_MAE_GRADE: Final = "mae-grade"  # ordinal: mean absolute grade error per patient

# --- Secure aggregation (common/secagg, client/secagg.py, server/strategies/secure.py) ------
# Run config
SECURE_AGGREGATION: Final = "secure-aggregation"  # "auto" | "on" | "off" (auto: on with >= 3 nodes)
SECAGG_MIN_SURVIVORS: Final = "secagg-min-survivors"  # 0 = default (common/secagg/params.py)
SECAGG_NEIGHBOURS: Final = "secagg-neighbours"  # 0 = default (common/secagg/params.py)
# RecordDict keys
SECAGG: Final = "secagg"  # ConfigRecord of a secure-aggregation stage (both directions)
SECAGG_MASKED: Final = "secagg-masked"  # ArrayRecord: the node's masked uint64 vector
SECAGG_VECTOR: Final = "vector"  # its one array
STATE_SECAGG: Final = "secagg-state"  # node-local: keys and seeds of the current session
# ConfigRecord keys, coordinator -> node
SECAGG_STAGE: Final = "secagg-stage"  # "advertise" | "share" | "unmask" (query messages)
SECAGG_SESSION: Final = "secagg-session"  # e.g. "train-3": one session per masked release
SECAGG_THRESHOLD: Final = "secagg-threshold"
SECAGG_NODES: Final = "secagg-nodes"  # node ids of the stage's participants
SECAGG_C_PKS: Final = "secagg-c-pks"  # their box public keys (same order)
SECAGG_S_PKS: Final = "secagg-s-pks"  # their mask public keys (same order)
SECAGG_SURVIVORS: Final = "secagg-survivors"  # unmask: nodes whose masked vectors arrived
SECAGG_DROPPED: Final = "secagg-dropped"  # unmask: nodes that shared secrets, sent no vector
SECAGG_SENDERS: Final = "secagg-senders"  # unmask: sender of each box (same order)
SECAGG_BOXES: Final = "secagg-boxes"  # share boxes (AES-GCM), in both directions
SECAGG_MODEL_BITS: Final = "secagg-model-bits"  # fractional bits of the model segment
SECAGG_MODEL_BOUND: Final = "secagg-model-bound"  # bound on one coordinate a node encodes
SECAGG_DP_CLIP: Final = "secagg-dp-clip"  # > 0: clip the update to this L2 norm, unweighted
SECAGG_WEIGHTED_KEYS: Final = "secagg-weighted-keys"  # metrics sent as num-examples x value
SECAGG_FLOAT_BITS: Final = "secagg-float-bits"
SECAGG_FLOAT_BOUND: Final = "secagg-float-bound"
SECAGG_INT_KEYS: Final = "secagg-int-keys"  # integer metrics (counts, histograms) summed
SECAGG_INT_LENGTHS: Final = "secagg-int-lengths"
# ConfigRecord keys, node -> coordinator
SECAGG_C_PK: Final = "secagg-c-pk"
SECAGG_S_PK: Final = "secagg-s-pk"
SECAGG_DEST: Final = "secagg-dest"  # share: recipient of each box (same order)
SECAGG_OWNERS: Final = "secagg-owners"  # unmask: whose secret each revealed share is
SECAGG_SHARES: Final = "secagg-shares"
