"""Study specs: one YAML file in ``studies/`` describes a whole study.

A spec names the tasks, base optimizers and regularizers to compare, the search
(ranges, sampler, budget, pruner, seed, objective), the evaluation, where results
go and which storage holds the trials. It is validated on load: every problem is
reported on its own line naming the file, the key path and the value.

A **cell** is one task x optimizer x regularizer. Each cell is its own Optuna study
named ``STUDY/TASK/OPTIMIZER/REGULARIZER``; its evaluation runs live in the study
``STUDY/TASK/OPTIMIZER/REGULARIZER/eval``. Every cell gets the same sampler, seed,
budget and learning-rate range. λ ranges may differ per regularizer (decoupled λ
multiplies the learning rate, so its useful values sit orders of magnitude above
L2's) but must then be equally wide in decades.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .arms import NAMES
from .config import did_you_mean, validate
from .errors import WdstudyError
from .tasks import TRAINING_FIELDS, TaskConfig

_STRICT = ConfigDict(extra="forbid", frozen=True)

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
#: The regularizer arms by registry name (:mod:`wdstudy.arms`; ``wdstudy.regularizers.REGULARIZERS``
#: has one class each).
REGULARIZER_NAMES = NAMES
#: Trials per generation when a spec does not say (never derived from the number of workers).
DEFAULT_BATCH = 4


class OptimizerConfig(BaseModel):
    """A base optimizer and its settings other than the learning rate and regularization."""

    model_config = _STRICT

    name: Literal["adam", "sgd"]
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = 0.0

    @field_validator("weight_decay")
    @classmethod
    def _no_own_decay(cls, v: float) -> float:
        if v != 0:
            raise ValueError(
                "the base optimizer is always built with weight_decay=0: the regularizer "
                "callback is the only source of regularization (set the regularizer's λ instead)"
            )
        return v


class LogRange(BaseModel):
    """A log-scale search range ``[low, high]`` with ``0 < low < high``."""

    model_config = _STRICT
    low: float = Field(gt=0)
    high: float = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> LogRange:
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("bounds must be finite")
        if self.low >= self.high:
            raise ValueError(f"low ({self.low:g}) must be below high ({self.high:g})")
        return self

    @property
    def decades(self) -> float:
        return math.log10(self.high / self.low)

    def grid(self, points: int) -> list[float]:
        """``points`` values evenly spaced in log, from ``low`` to ``high`` exactly (and inside them)."""
        if points == 1:
            return [min(max(math.sqrt(self.low * self.high), self.low), self.high)]
        a, b = math.log10(self.low), math.log10(self.high)
        inner = [min(max(10 ** (a + (b - a) * i / (points - 1)), self.low), self.high) for i in range(1, points - 1)]
        return [self.low, *inner, self.high]


class DecayRange(LogRange):
    """A λ range; for the decoupled arm it may instead range over the per-step shrink η·λ
    (``axis: shrink``: λ = shrink/η), its timescale 1/(η·λ) in steps (``axis: timescale``) or
    that timescale in epochs, τ_epoch = 1/(η·λ·steps per epoch) (``axis: timescale_epochs``:
    λ = 1/(η·τ_epoch·steps per epoch), for tasks whose steps per epoch are known before training)."""

    axis: Literal["lambda", "shrink", "timescale", "timescale_epochs"] = "lambda"

    def lambda_range(self, lr: LogRange, steps_per_epoch: int | None = None) -> tuple[float, float]:
        """Every λ the search can reach with learning rates in ``lr`` (``timescale_epochs`` needs the
        task's ``steps_per_epoch``)."""
        if self.axis == "shrink":
            return self.low / lr.high, self.high / lr.low
        if self.axis == "timescale":
            return 1.0 / (self.high * lr.high), 1.0 / (self.low * lr.low)
        if self.axis == "timescale_epochs":
            if steps_per_epoch is None:
                raise ValueError("a timescale in epochs converts to λ with the task's steps per epoch")
            return 1.0 / (self.high * lr.high * steps_per_epoch), 1.0 / (self.low * lr.low * steps_per_epoch)
        return self.low, self.high


class SearchSpec(BaseModel):
    model_config = _STRICT
    lr: LogRange
    weight_decay: DecayRange | dict[str, DecayRange]
    sampler: Literal["tpe", "random", "grid"] = "tpe"
    trials: int | None = Field(None, ge=1, description="budget per cell; grid: points per axis squared")
    grid_points: int | None = Field(None, ge=1, description="grid sampler: points per axis")
    startup_trials: int | None = Field(None, ge=1, description="TPE: random trials before modelling")
    pruner: Literal["none", "median"] = "none"
    batch: int = Field(DEFAULT_BATCH, ge=1, description="trials per generation: proposals see finished generations only")
    seed: int = Field(0, ge=0, lt=2**31)
    objective: Literal["val_error", "val_loss"] = "val_error"

    @model_validator(mode="after")
    def _budget(self) -> SearchSpec:
        if self.sampler == "grid":
            if self.grid_points is None:
                raise ValueError("the grid sampler needs grid_points (points per axis)")
            if self.trials is not None:
                raise ValueError("trials is set by the grid (grid_points per axis); leave it out")
        else:
            if self.trials is None:
                raise ValueError(f"the {self.sampler} sampler needs trials (the budget per cell)")
            if self.grid_points is not None:
                raise ValueError("grid_points applies to the grid sampler only")
        return self


class SeedRounds(BaseModel):
    """Evaluation in rounds: ``min`` seeds first, then ``step`` more per round while a primary
    decision of the task is still open, up to ``max`` (see :mod:`wdstudy.decide`)."""

    model_config = _STRICT
    min: int = Field(ge=2, description="seeds of the first round")
    max: int = Field(ge=2, le=200, description="seeds at most")
    step: int = Field(ge=1, description="seeds added per round")

    @model_validator(mode="after")
    def _ordered(self) -> SeedRounds:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


class EvaluationSpec(BaseModel):
    model_config = _STRICT
    seeds: int | SeedRounds = Field(3, description="retrainings of each cell's chosen configuration: a number, "
                                                    "or rounds {min, max, step} that stop once decided")
    first_seed: int = Field(1000, ge=0, lt=2**31, description="seeds first_seed, first_seed+1, ... (the search uses search.seed)")

    @field_validator("seeds")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1")
        return v

    def looks(self) -> list[int]:
        """The seed counts after which a decision is taken: ``[n]`` for a plain number."""
        s = self.seeds
        if isinstance(s, int):
            return [s]
        out = list(range(s.min, s.max, s.step))
        return out + [s.max]

    @property
    def max_seeds(self) -> int:
        return self.looks()[-1]

    def seed_list(self, n: int | None = None) -> list[int]:
        """The first ``n`` evaluation seeds (all ``max`` by default)."""
        return list(range(self.first_seed, self.first_seed + (self.max_seeds if n is None else n)))


class DecisionSpec(BaseModel):
    """What a comparison must show to end in a decision (see :mod:`wdstudy.decide`)."""

    model_config = _STRICT
    margin: float = Field(1.0, gt=0, description="the smallest difference that matters, in points of an error "
                                                 "rate (1.0 = one percentage point)")
    mse_margin: float = Field(0.01, gt=0, description="the same for a regression task, in its MSE")
    alpha: float = Field(0.05, gt=0, lt=0.5, description="the chance of a wrong 'better' per family, over all rounds")
    primary: list[tuple[str, str]] = Field(default_factory=lambda: [("decoupled", "l2")],
                                           description="the comparisons (arm, reference) the study is for; "
                                                       "Holm-corrected together, per task × optimizer")

    def margin_for(self, is_rate: bool) -> float:
        """The margin in the metric's own unit (a fraction for an error rate)."""
        return self.margin / 100 if is_rate else self.mse_margin


class SelectionSpec(BaseModel):
    """The post-selection race: after a cell's search, its ``top_k`` best configurations are
    re-run on ``seeds`` new seeds (validation only) and the lowest mean is the pick."""

    model_config = _STRICT
    top_k: int = Field(1, ge=1, le=50, description="candidates re-run after the search (1: no race)")
    seeds: int = Field(0, ge=0, le=50, description="new seeds each candidate is re-run on (0: no race)")
    first_seed: int = Field(2000, ge=0, lt=2**31, description="race seeds first_seed, first_seed+1, ...")

    @property
    def races(self) -> bool:
        return self.top_k >= 2 and self.seeds >= 1

    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds)) if self.races else []


#: what the report's landscape figure draws on its y axis: ``lambda`` (λ, every arm), ``tau_epoch``
#: (the decoupled-decay arms over their timescale τ_epoch in epochs; the other arms stay over λ), or
#: ``auto``: ``tau_epoch`` when the decoupled arm was searched over ``timescale_epochs``, else ``lambda``
LANDSCAPE_AXES = ("auto", "lambda", "tau_epoch")


class ReportSpec(BaseModel):
    """How the report draws what the study measured (it changes no run: a report can be rebuilt with
    other settings at any time)."""

    model_config = _STRICT
    landscape_axis: Literal["auto", "lambda", "tau_epoch"] = Field(
        "auto", description="the y axis of the landscape figure's decoupled-decay panels: `lambda` (λ), "
                            "`tau_epoch` (their timescale τ_epoch = 1/(η·λ·steps per epoch), with the band from one "
                            "epoch to the training length), or `auto` (`tau_epoch` when the decoupled arm was "
                            "searched over `timescale_epochs`, else `lambda`); `report --landscape-axis` overrides it")


def check_landscape_axis(value: str, where: str = "--landscape-axis") -> str:
    """``value`` if it is one of :data:`LANDSCAPE_AXES`, else a one-line error naming ``where``."""
    if value not in LANDSCAPE_AXES:
        raise WdstudyError(f"{where}={value!r}: choose {', '.join(LANDSCAPE_AXES[:-1])} or {LANDSCAPE_AXES[-1]}")
    return value


#: how far apart the seeds of two replicates are (more than any study's seeds of one kind)
REPLICA_STRIDE = 100_003


class StudySpec(BaseModel):
    """A whole study as written in ``studies/NAME.yaml``."""

    model_config = _STRICT
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    description: str = ""
    tasks: list[TaskConfig] = Field(min_length=1)
    task_defaults: dict[str, Any] = Field(default_factory=dict, description="overrides applied to every task")
    optimizers: list[OptimizerConfig] = Field(min_length=1)
    regularizers: list[str] = Field(min_length=1)
    schedule: Literal["constant", "cosine"] = "cosine"
    decay_all: bool = False
    search: SearchSpec
    evaluation: EvaluationSpec = EvaluationSpec()
    selection: SelectionSpec = SelectionSpec()
    decision: DecisionSpec = DecisionSpec()
    report: ReportSpec = ReportSpec()
    replicates: int = Field(1, ge=1, le=20, description="independent repeats of each cell's whole pipeline (search, "
                            "race, evaluation) on their own seeds; with 2 or more, decisions rest on the spread "
                            "between replicates, the luck of the pick included")
    output: str | None = None
    storage: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _expand(cls, data: Any) -> Any:
        """Accept ``- mlp-mnist1d`` for ``- {name: mlp-mnist1d}``; apply ``task_defaults``.

        A factory task takes only the training fields of ``task_defaults`` (epochs, batch size,
        precision, ...): the others describe the built-in backbones and datasets, and passed to
        a factory as options they would be arguments it never asked for.
        """
        if not isinstance(data, dict):
            return data
        data = dict(data)
        defaults = data.get("task_defaults") or {}
        if isinstance(data.get("tasks"), list) and isinstance(defaults, dict):
            training = {k: v for k, v in defaults.items() if k in TRAINING_FIELDS}
            data["tasks"] = [
                {**defaults, "name": t} if isinstance(t, str)
                else ({**(training if t.get("factory") is not None else defaults), **t} if isinstance(t, dict) else t)
                for t in data["tasks"]
            ]
        if isinstance(data.get("optimizers"), list):
            data["optimizers"] = [{"name": o} if isinstance(o, str) else o for o in data["optimizers"]]
        return data

    @field_validator("regularizers")
    @classmethod
    def _known_regularizers(cls, v: list[str]) -> list[str]:
        for name in v:
            if name not in REGULARIZER_NAMES:
                raise ValueError(f"unknown regularizer {name!r}{did_you_mean(name, REGULARIZER_NAMES)} "
                                 f"(choose from {', '.join(REGULARIZER_NAMES)})")
        if len(set(v)) != len(v):
            raise ValueError("a regularizer is listed twice")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"a task is listed twice: {names}")
        opts = [o.name for o in self.optimizers]
        if len(set(opts)) != len(opts):
            raise ValueError(f"an optimizer is listed twice: {opts}")
        race = set(self.selection.seed_list())
        evals = set(self.evaluation.seed_list())
        if race & (evals | {self.search.seed}):
            clash = sorted(race & (evals | {self.search.seed}))
            raise ValueError(f"selection.first_seed: race seeds {min(race)}–{max(race)} must not repeat the search "
                             f"seed or an evaluation seed (both use {clash[0]})")
        if self.replicates > 1 and len(self.evaluation.looks()) > 1:
            raise ValueError("evaluation.seeds: rounds {min, max, step} need replicates: 1 (with replicates the "
                             "decision rests on the spread between replicates, which more seeds do not shrink); "
                             "give a number of seeds")
        for pair in self.decision.primary:
            for arm in pair:
                if arm not in REGULARIZER_NAMES:
                    raise ValueError(f"decision.primary: unknown regularizer {arm!r}; choose from "
                                     f"{', '.join(REGULARIZER_NAMES)}")
            if pair[0] == pair[1]:
                raise ValueError(f"decision.primary: {list(pair)} compares an arm with itself")
        wd = self.search.weight_decay
        decayed = [r for r in self.regularizers if r != "none"]
        for r in decayed:
            rng = wd[r] if isinstance(wd, dict) else wd
            if rng is not None and rng.axis != "lambda" and r != "decoupled":
                where = f"search.weight_decay.{r}.axis" if isinstance(wd, dict) else "search.weight_decay.axis"
                raise ValueError(f"{where}: {rng.axis!r} applies to the decoupled arm only (its shrink is η·λ); "
                                 f"search {r} over λ (axis: lambda)")
            if rng is not None and rng.axis == "timescale_epochs":
                user = next(((i, t) for i, t in enumerate(self.tasks) if t.steps_per_epoch is None), None)
                if user is not None:
                    where = f"search.weight_decay.{r}.axis" if isinstance(wd, dict) else "search.weight_decay.axis"
                    raise ValueError(
                        f"{where}='timescale_epochs': task {user[1].name!r} (tasks.{user[0]}) is a factory task, "
                        "whose steps per epoch are not known before it trains; search it over axis: timescale "
                        "(1/(η·λ) in steps) instead")
        if isinstance(wd, dict):
            missing = [r for r in decayed if r not in wd]
            extra = [r for r in wd if r not in decayed]
            if missing or extra:
                raise ValueError(
                    "search.weight_decay per regularizer must name exactly the regularizers "
                    f"{decayed} (missing {missing}, not in the study {extra})"
                )
            widths = {r: wd[r].decades for r in decayed}
            if len(decayed) > 1 and max(widths.values()) - min(widths.values()) > 1e-6:
                shown = ", ".join(f"{r}: {w:.3g}" for r, w in widths.items())
                raise ValueError(f"per-regularizer λ ranges must be equally wide in decades ({shown})")
        return self

    # -- derived ---------------------------------------------------------------------

    def weight_decay_range(self, regularizer: str) -> DecayRange | None:
        if regularizer == "none":
            return None
        wd = self.search.weight_decay
        return wd[regularizer] if isinstance(wd, dict) else wd

    def budget(self, regularizer: str) -> int:
        """Trials per cell. With a grid, the 'none' arm searches the learning-rate axis only."""
        if self.search.sampler == "grid":
            n = self.search.grid_points
            assert n is not None, "a grid search has grid_points (validated)"
            return n if regularizer == "none" else n * n
        assert self.search.trials is not None, "a tpe or random search has trials (validated)"
        return self.search.trials

    def primary_pairs(self) -> list[tuple[str, str]]:
        """The spec's primary comparisons whose two arms are both in the study."""
        return [p for p in self.decision.primary if p[0] in self.regularizers and p[1] in self.regularizers]

    def cells(self) -> list[Cell]:
        return [
            Cell(self.name, task, opt, reg, r)
            for task in self.tasks
            for opt in self.optimizers
            for reg in self.regularizers
            for r in range(self.replicates)
        ]

    def replica(self, replicate: int) -> StudySpec:
        """The spec as replicate ``replicate`` runs it: the search, race and evaluation seeds all
        moved by ``replicate`` × :data:`REPLICA_STRIDE` (replicate 0 is the spec itself)."""
        if replicate == 0:
            return self
        shift = replicate * REPLICA_STRIDE
        return self.model_copy(update={
            "search": self.search.model_copy(update={"seed": (self.search.seed + shift) % 2**31}),
            "selection": self.selection.model_copy(update={"first_seed": self.selection.first_seed + shift}),
            "evaluation": self.evaluation.model_copy(update={"first_seed": self.evaluation.first_seed + shift}),
        })

    def study_names(self) -> list[str]:
        """Every Optuna study of this study: each cell's search, race (if any) and evaluation studies."""
        race = self.selection.races
        return [n for c in self.cells() for n in ((c.name, c.race_name, c.eval_name) if race else (c.name, c.eval_name))]

    def output_dir(self, root: Path | None = None) -> Path:
        return Path(self.output) if self.output else (root or Path("reports")) / self.name


@dataclass(frozen=True)
class Cell:
    """One task x optimizer x regularizer: one Optuna study in the shared storage."""

    study: str
    task: TaskConfig
    optimizer: OptimizerConfig
    regularizer: str
    replicate: int = 0  #: which repeat of the cell's pipeline (``replicates`` in the spec); 0 is the first

    @property
    def suffix(self) -> str:
        """``/r2``, ``/r3``, ... for the second, third replicate; nothing for the first."""
        return f"/r{self.replicate + 1}" if self.replicate else ""

    @property
    def name(self) -> str:
        return f"{self.study}/{self.task.name}/{self.optimizer.name}/{self.regularizer}{self.suffix}"

    @property
    def eval_name(self) -> str:
        return f"{self.name}/eval"

    @property
    def race_name(self) -> str:
        return f"{self.name}/race"

    @property
    def label(self) -> str:
        return f"{self.task.name}/{self.optimizer.name}/{self.regularizer}{self.suffix}"


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate ``path``; any problem raises WdstudyError naming the file."""
    p = Path(path)
    if not p.is_file():
        raise WdstudyError(f"spec={str(p)!r}: no such file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise WdstudyError(f"{p}:{where}: not valid YAML ({problem})") from None
    if not isinstance(data, dict):
        raise WdstudyError(f"{p}: (top level)={data!r}: a study spec is a mapping of keys")
    return validate(StudySpec, data, where=str(p))

