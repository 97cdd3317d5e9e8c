"""Every key wdstudy writes to an Optuna storage, and the package-version record.

One owner for the storage's vocabulary: the engine (``cells``, ``worker``, ``storage``)
writes these keys and the read side (``analysis``, ``report``) reads them, and neither
spells a key itself. Plain data only (no torch), so reading a study stays fast.

Per study (user attributes):

* search study ``STUDY/TASK/OPT/REG``: :data:`CELL` (what defines the cell, checked on
  resume), :data:`VERSIONS`, :data:`SPEC_YAML`;
* race study ``.../race`` (where the spec races): :data:`CANDIDATES`, the search's best
  configurations re-run on new seeds;
* evaluation study ``.../eval``: :data:`BEST_TRIAL`, :data:`BEST_VALUE`, :data:`RACE_MEAN`
  (with a race), :data:`BEST_PARAMS` (the configuration its runs retrain).

Per trial:

* user attributes, shown in the dashboard and the exports: :data:`GENERATION` and
  :data:`SLOT` (search), :data:`SEED` (race and evaluation), :data:`CANDIDATE` (race), :data:`VARIANT` (a replacement
  proposal after a slot's retries ran out), :data:`OUTCOME`, :data:`REASON`,
  :data:`WORKER`, :data:`CUDA_VISIBLE_DEVICES`, :data:`DEVICE` (what the run trained on,
  ``cuda:0 NAME`` or ``cpu``: written as training starts, so pruned and diverged runs have
  it too), the metrics :data:`METRIC_KEYS` (with the run's mechanics scalars,
  :data:`MECHANICS_KEYS`), :data:`HISTORY` and :data:`MECHANICS` (per layer and checkpoint);
* system attributes, the engine's bookkeeping: :data:`OWNER` (``host:pid``),
  :data:`LEASE` (wall-clock time of the owner's last renewal), :data:`FAIL_REASON` and
  :data:`FAIL_KIND` (:data:`ERROR`: the run raised; :data:`LOST`: its worker died, was
  stopped or let its lease expire).
"""

from __future__ import annotations

import importlib.metadata
import sys

# -- studies ---------------------------------------------------------------------------------
CELL = "cell"
VERSIONS = "versions"
SPEC_YAML = "spec_yaml"
BEST_TRIAL = "best_trial"
BEST_VALUE = "best_value"
BEST_PARAMS = "best_params"
RACE_MEAN = "race_mean"  # evaluation study: the pick's mean validation result in the race
CANDIDATES = "candidates"  # race study: the search's top-k configurations, best first (its presence marks it complete)
CANDIDATE = "candidate"  # race and evaluation trial: the index of its candidate in CANDIDATES
PICK = "pick"  # evaluation study: the index in CANDIDATES of the race's pick
SURVIVORS = "survivors"  # evaluation study: CANDIDATES indices the race could not tell from the pick (pick first)
SEEDS_OPEN = "seeds_open"  # evaluation study: evaluation seeds opened so far (rounds)
DECISION = "decision"  # search study: the spec's decision settings (margin, alpha, primary, looks)

# -- trials: user attributes -----------------------------------------------------------------
GENERATION = "generation"
SLOT = "slot"
VARIANT = "variant"
SEED = "seed"
OUTCOME = "outcome"  # complete | pruned | diverged
REASON = "reason"
WORKER = "worker"
CUDA_VISIBLE_DEVICES = "cuda_visible_devices"
DEVICE = "device"
HISTORY = "history"
TEST_OUTCOMES = "test_outcomes"  # evaluation trial: per-example test outcomes (see encode_outcomes)
#: per layer and checkpoint, column-wise ({column: [values]}): see wdstudy.mechanics.Mechanics.table
MECHANICS = "mechanics"
#: the run's mechanics scalars (wdstudy.mechanics.Mechanics.summary): timescale in steps and epochs,
#: the run's length, integrated shrink, equilibrium ratio, across-layer imbalance, the callback's overhead
MECHANICS_KEYS = (
    "tau_iter", "tau_epoch", "steps_per_epoch", "run_epochs", "integrated_shrink", "equilibrium_ratio",
    "equilibrium_ratio_min", "equilibrium_ratio_max", "angular_imbalance", "mechanics_overhead",
)
METRIC_KEYS = (
    "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error",
    "val_gap_loss", "val_gap_error", "gap_loss", "gap_error", "weight_norm", "l2_penalty",
    "zero_fraction", "val_size", "epochs", "steps", "wall_time_s", DEVICE, "precision", "seed",
) + MECHANICS_KEYS

# -- trials: system attributes ---------------------------------------------------------------
OWNER = "owner"
LEASE = "lease"
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"
ERROR = "error"
LOST = "lost"

# -- the searched strength ------------------------------------------------------------------
#: How a spec may search an arm's strength, and the trial parameter that holds it: λ itself
#: (``weight_decay``), or, for the decoupled arm, the per-step shrink η·λ (``shrink``) or its
#: timescale 1/(η·λ) in steps (``timescale``). λ follows from the parameters in every case.
DECAY_AXES = {"lambda": "weight_decay", "shrink": "shrink", "timescale": "timescale"}
DECAY_AXIS = "decay_axis"  # cell record: {"axis": ..., "range": [low, high]} when the axis is not λ


def decay_of(params: dict) -> float:
    """λ of a trial from its parameters, whichever axis searched it (0 for the ``none`` arm)."""
    if "weight_decay" in params:
        return params["weight_decay"]
    if "shrink" in params:
        return params["shrink"] / params["lr"]
    if "timescale" in params:
        return 1.0 / (params["timescale"] * params["lr"])
    return 0.0


def axis_value(axis: str, lr: float, wd: float) -> float:
    """The searched coordinate of (η, λ) on ``axis``: λ, η·λ or 1/(η·λ)."""
    return {"lambda": wd, "shrink": lr * wd, "timescale": 1.0 / (lr * wd) if lr * wd else float("inf")}[axis]


def searched_decay(cell: dict) -> tuple[str, list[float]] | None:
    """A cell record's searched strength axis and its range (None for the ``none`` arm)."""
    if cell.get("weight_decay_range") is None:
        return None
    extra = cell.get(DECAY_AXIS)
    return (extra["axis"], extra["range"]) if extra else ("lambda", cell["weight_decay_range"])


PACKAGES = ("wdstudy", "torch", "torchvision", "lightning", "optuna", "optuna-integration", "pandas", "numpy")


def package_versions() -> dict[str, str]:
    """Python's and the main packages' versions, from their metadata (imports nothing)."""
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def encode_outcomes(values, is_rate: bool) -> str:
    """Per-example test outcomes, compactly: one bit per example (wrong = 1) for an error rate,
    float16 squared errors for a regression; base64 text, tagged with its kind and length
    (10,000 CIFAR-10 examples: 1.7 kB)."""
    import base64

    import numpy as np

    x = np.asarray(values)
    if is_rate:
        body = np.packbits(x.astype(bool)).tobytes()
        kind = "bits"
    else:
        body = x.astype("<f2").tobytes()
        kind = "f16"
    return f"{kind}:{len(x)}:{base64.b64encode(body).decode()}"


def decode_outcomes(text: str):
    """The array :func:`encode_outcomes` stored (0/1 floats, or squared errors)."""
    import base64

    import numpy as np

    kind, n, body = text.split(":", 2)
    raw = base64.b64decode(body)
    if kind == "bits":
        return np.unpackbits(np.frombuffer(raw, dtype=np.uint8))[: int(n)].astype(float)
    return np.frombuffer(raw, dtype="<f2")[: int(n)].astype(float)
