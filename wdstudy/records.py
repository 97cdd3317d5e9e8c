"""Every key wdstudy writes to an Optuna storage, the typed records that read them back, and the
package-version record.

One owner for the storage's vocabulary: the engine (``cells``, ``phases``, ``worker``,
``storage``) writes these keys and the read side (``analysis``, ``report``, ``verdicts``,
``simulate``, and the engine where it reads) reads them back through the typed records
:class:`CellRecord`, :class:`RunRecord` (a trial) and :class:`StudyRecord` (a study), and
neither spells a key itself. Plain data only (no torch), so reading a study stays fast.

Per study (user attributes):

* search study ``STUDY/TASK/OPT/REG``: :data:`CELL` (what defines the cell, checked on
  resume: a :class:`CellRecord`, read back with :func:`cell_of`), :data:`VERSIONS`, :data:`SPEC_YAML`;
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
  :data:`MECHANICS_KEYS`; :meth:`RunRecord.metric` reads them, also under their older names),
  :data:`HISTORY` (:attr:`RunRecord.history`) and :data:`MECHANICS` (per layer and checkpoint);
* system attributes, the engine's bookkeeping: :data:`OWNER` (``host:pid``),
  :data:`LEASE` (wall-clock time of the owner's last renewal), :data:`FAIL_REASON` and
  :data:`FAIL_KIND` (:data:`ERROR`: the run raised; :data:`LOST`: its worker died, was
  stopped or let its lease expire; :data:`STORAGE`: its worker stopped because the storage or
  the run's files could not be written — a full disk, not the run's failure, so it does not
  count against the retries; :data:`DUPLICATE`: a second copy of a queued unit, never run).
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    "val_gap_loss", "val_gap_error", "gap_loss", "gap_error", "weight_norm", "penalty",
    "zero_fraction", "val_size", "epochs", "steps", "wall_time_s", DEVICE, "precision", "seed",
) + MECHANICS_KEYS

#: metric and history keys that earlier releases stored under another name: {key: its old name}
#: (``penalty``, the term an arm adds to the objective — L2's or L1's, None for the decays — was
#: stored as ``l2_penalty``)
OLD_NAMES = {"penalty": "l2_penalty"}


def metric_of(attrs: Mapping[str, Any], key: str) -> Any:
    """A trial's metric ``key`` from its user attributes, also from a trial an earlier release
    stored under the key's old name (:data:`OLD_NAMES`)."""
    value = attrs.get(key)
    if value is None and key in OLD_NAMES:
        value = attrs.get(OLD_NAMES[key])
    return value


_CURRENT_NAMES = {v: k for k, v in OLD_NAMES.items()}


def history_row(row: dict[str, Any]) -> dict[str, Any]:
    """One epoch of a stored :data:`HISTORY`, its keys under their current names."""
    return {_CURRENT_NAMES.get(k, k): v for k, v in row.items()}


# -- trials: system attributes ---------------------------------------------------------------
OWNER = "owner"
LEASE = "lease"
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"
ERROR = "error"
LOST = "lost"
#: a unit queued twice (its first queuing reached the storage, the answer did not): the copy is never run
DUPLICATE = "duplicate"
STORAGE = "storage"


def duplicate(trial) -> bool:
    """Whether ``trial`` is a unit's second copy, ended unrun (:meth:`wdstudy.cells.Retries.end_duplicates`)."""
    return trial.system_attrs.get(FAIL_KIND) == DUPLICATE


# -- the searched strength ------------------------------------------------------------------
#: How a spec may search an arm's strength, and the trial parameter that holds it: λ itself
#: (``weight_decay``), or, for the decoupled arm, the per-step shrink η·λ (``shrink``), its
#: timescale 1/(η·λ) in steps (``timescale``) or in epochs, 1/(η·λ·steps per epoch)
#: (``timescale_epochs``, Wang & Aitchison's τ_epoch). λ follows from the parameters in every
#: case — for ``timescale_epochs`` with the cell's steps per epoch (:attr:`CellRecord.steps_per_epoch`).
DECAY_AXES = {"lambda": "weight_decay", "shrink": "shrink", "timescale": "timescale",
              "timescale_epochs": "timescale_epochs"}
#: cell record: {"axis": ..., "range": [low, high]} when the axis is not λ, and for
#: ``timescale_epochs`` also the "steps_per_epoch" its λ is computed with
DECAY_AXIS = "decay_axis"


def decay_of(params: dict, steps_per_epoch: float | None = None) -> float:
    """λ of a trial from its parameters, whichever axis searched it (0 for the ``none`` arm);
    a ``timescale_epochs`` parameter needs the cell's ``steps_per_epoch``."""
    if "weight_decay" in params:
        return params["weight_decay"]
    if "shrink" in params:
        return params["shrink"] / params["lr"]
    if "timescale" in params:
        return 1.0 / (params["timescale"] * params["lr"])
    if "timescale_epochs" in params:
        if not steps_per_epoch:
            raise ValueError("λ from a timescale in epochs needs the cell's steps per epoch")
        return 1.0 / (params["timescale_epochs"] * params["lr"] * steps_per_epoch)
    return 0.0


def axis_value(axis: str, lr: float, wd: float, steps_per_epoch: float | None = None) -> float:
    """The searched coordinate of (η, λ) on ``axis``: λ, η·λ, 1/(η·λ) or 1/(η·λ·steps per epoch)
    (``timescale_epochs`` needs the cell's ``steps_per_epoch``)."""
    if axis == "timescale_epochs":
        if not steps_per_epoch:
            raise ValueError("a timescale in epochs needs the cell's steps per epoch")
        return 1.0 / (lr * wd * steps_per_epoch) if lr * wd else float("inf")
    return {"lambda": wd, "shrink": lr * wd, "timescale": 1.0 / (lr * wd) if lr * wd else float("inf")}[axis]


# -- the cell record ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Race:
    """A cell record's race: its ``top_k`` candidates re-run on the race ``seeds``."""

    top_k: int
    seeds: tuple[int, ...]


@dataclass(frozen=True)
class CellRecord:
    """What defines a cell (:data:`CELL`, written by ``wdstudy.cells.cell_record``), checked
    again on resume and read by the analysis and the report.

    Stored as a plain mapping (:meth:`to_dict`) in the search study's user attributes;
    :meth:`from_dict` reads it back, also from studies stored by earlier releases. ``task`` and
    ``optimizer`` are the task's and optimizer's fields as stored (``task["name"]``,
    ``task["epochs"]``, a factory task's ``factory`` and ``options``, ...): read them, never
    change them.
    """

    study: str
    task: dict[str, Any] = field(hash=False)
    optimizer: dict[str, Any] = field(hash=False)
    regularizer: str
    schedule: str
    decay_all: bool
    lr_range: tuple[float, float]
    #: every λ the search can reach (None for the ``none`` arm)
    weight_decay_range: tuple[float, float] | None
    sampler: str
    budget: int
    #: trials per generation (None in records of studies started before generations)
    batch: int | None
    pruner: str
    seed: int
    objective: str
    #: every evaluation seed a cell may run (with rounds: up to their ``max``)
    eval_seeds: tuple[int, ...]
    #: the searched strength axis and its range, when it is not λ (``shrink``, ``timescale`` or
    #: ``timescale_epochs``)
    decay_axis: tuple[str, tuple[float, float]] | None = None
    #: the task's optimizer steps per epoch, which a ``timescale_epochs`` axis converts with (None
    #: for the other axes; stored in the record's ``decay_axis``)
    steps_per_epoch: int | None = None
    #: the seed counts after which a decision is taken, when the evaluation runs in rounds
    eval_rounds: tuple[int, ...] | None = None
    #: the race, when the spec races
    selection: Race | None = None
    #: which repeat of the cell's pipeline (the spec's ``replicates``); 0, the first, is not stored
    replicate: int = 0

    @property
    def task_name(self) -> str:
        return self.task["name"]

    @property
    def optimizer_name(self) -> str:
        return self.optimizer["name"]

    @property
    def looks(self) -> tuple[int, ...]:
        """The seed counts after which a decision is taken (one look without rounds)."""
        return self.eval_rounds or (len(self.eval_seeds),)

    @property
    def race_seeds(self) -> tuple[int, ...]:
        """The race's seeds (none without a race)."""
        return self.selection.seeds if self.selection else ()

    @property
    def searched_decay(self) -> tuple[str, tuple[float, float]] | None:
        """The searched strength axis and its range (None for the ``none`` arm)."""
        if self.weight_decay_range is None:
            return None
        return self.decay_axis or ("lambda", self.weight_decay_range)

    def decay_of(self, params: dict) -> float:
        """λ of one of the cell's trials from its parameters (:func:`decay_of`)."""
        return decay_of(params, self.steps_per_epoch)

    def axis_value(self, axis: str, lr: float, wd: float) -> float:
        """The coordinate of (η, λ) on ``axis`` in this cell (:func:`axis_value`)."""
        return axis_value(axis, lr, wd, self.steps_per_epoch)

    def to_dict(self) -> dict[str, Any]:
        """The stored form: JSON-ready, and the optional keys only when set, so the records of
        studies that never used them stay as those studies stored them."""
        out = {
            "study": self.study, "task": self.task, "optimizer": self.optimizer, "regularizer": self.regularizer,
            "schedule": self.schedule, "decay_all": self.decay_all, "lr_range": list(self.lr_range),
            "weight_decay_range": None if self.weight_decay_range is None else list(self.weight_decay_range),
        }
        if self.decay_axis is not None:
            axis: dict[str, Any] = {"axis": self.decay_axis[0], "range": list(self.decay_axis[1])}
            if self.steps_per_epoch is not None:
                axis["steps_per_epoch"] = self.steps_per_epoch
            out[DECAY_AXIS] = axis
        out.update({"sampler": self.sampler, "budget": self.budget, "batch": self.batch, "pruner": self.pruner,
                    "seed": self.seed, "objective": self.objective, "eval_seeds": list(self.eval_seeds)})
        if self.eval_rounds is not None:
            out["eval_rounds"] = list(self.eval_rounds)
        if self.selection is not None:
            out["selection"] = {"top_k": self.selection.top_k, "seeds": list(self.selection.seeds)}
        if self.replicate:
            out["replicate"] = self.replicate
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CellRecord:
        """A stored record (:meth:`to_dict`), also one an earlier release stored: keys added
        since (``batch``, ``eval_rounds``, ``selection``, ``decay_axis``) may be missing."""
        wd = d.get("weight_decay_range")
        axis = d.get(DECAY_AXIS)
        rounds = d.get("eval_rounds")
        race = d.get("selection")
        return cls(
            study=d.get("study", ""), task=d["task"], optimizer=d["optimizer"], regularizer=d["regularizer"],
            schedule=d.get("schedule", "cosine"), decay_all=bool(d.get("decay_all", False)),
            lr_range=_pair(d["lr_range"]), weight_decay_range=None if wd is None else _pair(wd),
            sampler=d.get("sampler", "tpe"), budget=int(d["budget"]), batch=d.get("batch"),
            pruner=d.get("pruner", "none"), seed=d.get("seed", 0), objective=d.get("objective", "val_error"),
            eval_seeds=tuple(d.get("eval_seeds") or ()),
            decay_axis=(axis["axis"], _pair(axis["range"])) if axis else None,
            steps_per_epoch=axis.get("steps_per_epoch") if axis else None,
            eval_rounds=tuple(rounds) if rounds else None,
            selection=Race(int(race["top_k"]), tuple(race["seeds"])) if race else None,
            replicate=int(d.get("replicate", 0)),
        )


def _pair(values) -> tuple[float, float]:
    low, high = values
    return low, high


def cell_of(attrs: Mapping[str, Any]) -> CellRecord | None:
    """The cell record in a study's user attributes (None for a study that is no cell's search)."""
    stored = attrs.get(CELL)
    return None if stored is None else CellRecord.from_dict(stored)


_T = TypeVar("_T")

# -- the run record -----------------------------------------------------------------------------


@dataclass(frozen=True)
class RunRecord:
    """What a trial's attributes say about its run, typed: the read side of the per-trial keys
    above (written by ``wdstudy.phases``, ``wdstudy.cells`` and ``wdstudy.worker`` under those
    keys, which stay the storage's format).

    :meth:`of` reads a trial (an Optuna ``FrozenTrial``), :meth:`from_attrs` its user (and
    system) attributes, also those an earlier release stored: a metric stored under its old
    name (:data:`OLD_NAMES`) is read under its current one, and a field the run never stored is
    None. Values are as stored (nothing is converted); ``metrics``, ``mechanics`` and the
    history's rows are the stored objects: read them, never change them.
    """

    #: search trial: its generation and slot in it, and the variant (> 0 for a replacement proposal)
    generation: int | None = None
    slot: int | None = None
    variant: int | None = None
    #: race and evaluation trial: the training seed; race trial (and a survivor's evaluation
    #: run): the index of its candidate in the race's :data:`CANDIDATES`
    seed: int | None = None
    candidate: int | None = None
    #: ``complete``, ``pruned`` or ``diverged``, and why a run did not complete
    outcome: str | None = None
    reason: str | None = None
    worker: str | None = None
    cuda_visible_devices: str | None = None
    #: what the run trained on (``cuda:0 NAME`` or ``cpu``)
    device: str | None = None
    #: evaluation trial: per-example test outcomes (:func:`decode_outcomes`)
    test_outcomes: str | None = None
    #: every metric of :data:`METRIC_KEYS` under its current name (None where not stored)
    metrics: dict[str, Any] = field(default_factory=dict, hash=False, repr=False)
    #: per layer and checkpoint, column-wise (None for a run made before it was recorded)
    mechanics: dict[str, list] | None = field(default=None, hash=False, repr=False)
    #: the epochs of :data:`HISTORY` as stored (see :attr:`history` for them under current names)
    stored_history: tuple[dict[str, Any], ...] = field(default=(), hash=False, repr=False)
    #: system attributes: why the run failed, and how (:data:`ERROR` or :data:`LOST`)
    fail_reason: str | None = None
    fail_kind: str | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """The run's epochs, their keys under their current names (:func:`history_row`)."""
        return [history_row(row) for row in self.stored_history]

    def metric(self, key: str) -> Any:
        """The metric ``key`` of :data:`METRIC_KEYS` (None where the run did not store it)."""
        return self.metrics.get(key)

    @property
    def val_size(self) -> int | None:
        """How many validation examples the run's metrics were measured on."""
        return self.metrics.get("val_size")

    def candidate_or(self, default: _T) -> int | _T:
        """The run's candidate; ``default`` (the pick) for an evaluation run that stores none."""
        return default if self.candidate is None else self.candidate

    @property
    def slot_key(self) -> tuple[int, int, int]:
        """(generation, slot, variant), 0 where not stored: a search trial's place in the proposals."""
        return (self.generation or 0, self.slot or 0, self.variant or 0)

    @classmethod
    def from_attrs(cls, user_attrs: Mapping[str, Any], system_attrs: Mapping[str, Any] | None = None) -> RunRecord:
        """The record of a trial with these user (and system) attributes."""
        ua, sa = user_attrs, system_attrs or {}
        return cls(
            generation=ua.get(GENERATION), slot=ua.get(SLOT), variant=ua.get(VARIANT), seed=ua.get(SEED),
            candidate=ua.get(CANDIDATE), outcome=ua.get(OUTCOME), reason=ua.get(REASON), worker=ua.get(WORKER),
            cuda_visible_devices=ua.get(CUDA_VISIBLE_DEVICES), device=ua.get(DEVICE),
            test_outcomes=ua.get(TEST_OUTCOMES), metrics={k: metric_of(ua, k) for k in METRIC_KEYS},
            mechanics=ua.get(MECHANICS), stored_history=tuple(ua.get(HISTORY) or ()),
            fail_reason=sa.get(FAIL_REASON), fail_kind=sa.get(FAIL_KIND),
        )

    @classmethod
    def of(cls, trial: Any) -> RunRecord:
        """The record of a trial (an Optuna ``FrozenTrial``: its user and system attributes)."""
        return cls.from_attrs(trial.user_attrs, trial.system_attrs)


@dataclass(frozen=True)
class StudyRecord:
    """What a study's user attributes say, typed: the read side of the per-study keys above
    (a search study's cell and decision settings, a race study's candidates, an evaluation
    study's pick, survivors, open seeds and chosen configuration). A key the study does not
    hold is None; values are as stored (the mappings and lists are the stored objects: read
    them, never change them)."""

    #: search study: what defines the cell (:func:`cell_of`), the decision settings
    cell: CellRecord | None = None
    decision: dict[str, Any] | None = field(default=None, hash=False)
    spec_yaml: str | None = None
    versions: dict[str, str] | None = field(default=None, hash=False)
    #: race study: the search's best configurations, best first (set once the race is complete)
    candidates: list[dict[str, Any]] | None = field(default=None, hash=False)
    #: evaluation study: the configuration its runs retrain (set last: the study is complete),
    #: the trial it came from, its objective and its race mean
    best_params: dict[str, Any] | None = field(default=None, hash=False)
    best_trial: int | None = None
    best_value: float | None = None
    race_mean: float | None = None
    #: evaluation study with a race: the pick's and the survivors' indices in the race's candidates
    pick: int | None = None
    survivors: list[int] | None = field(default=None, hash=False)
    #: evaluation study: the evaluation seeds opened so far
    seeds_open: int | None = None

    def seeds_open_or(self, default: int) -> int:
        """The evaluation seeds opened so far; ``default`` for a study that stores none."""
        return default if self.seeds_open is None else self.seeds_open

    @classmethod
    def from_attrs(cls, user_attrs: Mapping[str, Any]) -> StudyRecord:
        """The record of a study with these user attributes."""
        a = user_attrs
        return cls(
            cell=cell_of(a), decision=a.get(DECISION), spec_yaml=a.get(SPEC_YAML), versions=a.get(VERSIONS),
            candidates=a.get(CANDIDATES), best_params=a.get(BEST_PARAMS), best_trial=a.get(BEST_TRIAL),
            best_value=a.get(BEST_VALUE), race_mean=a.get(RACE_MEAN), pick=a.get(PICK), survivors=a.get(SURVIVORS),
            seeds_open=a.get(SEEDS_OPEN),
        )

    @classmethod
    def of(cls, study: Any) -> StudyRecord:
        """The record of a study (an Optuna ``Study`` or ``FrozenStudy``: its user attributes)."""
        return cls.from_attrs(study.user_attrs)


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
