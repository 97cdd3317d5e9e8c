"""Proposals: the searched parameters, the sampler's proposals per generation, rankings and the pruner.

Pure functions of a spec, a cell and finished trials (no storage writes, no torch), so that
every worker that asks gets the same answer: the engine (:mod:`wdstudy.cells`) and the phases
(:mod:`wdstudy.phases`) call them under the study lock.
"""

from __future__ import annotations

import math
import warnings
from typing import cast

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from . import records as R
from .spec import Cell, StudySpec

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


# -- the searched parameters ---------------------------------------------------------------------

def distributions(spec: StudySpec, cell: Cell) -> dict[str, BaseDistribution]:
    """The searched parameters of a cell: ``lr`` and (unless the arm is ``none``) the strength on
    its axis: ``weight_decay`` (λ), ``shrink``, ``timescale`` or ``timescale_epochs`` (see
    ``records.DECAY_AXES``)."""
    out: dict[str, BaseDistribution] = {"lr": FloatDistribution(spec.search.lr.low, spec.search.lr.high, log=True)}
    wd = spec.weight_decay_range(cell.regularizer)
    if wd is not None:
        out[R.DECAY_AXES[wd.axis]] = FloatDistribution(wd.low, wd.high, log=True)
    return out


def metric_names(study: optuna.Study, name: str, cell: Cell) -> None:
    """Name the objective, so the dashboard labels its axes with it (``val_error (MSE)`` for a
    regression task, whose error is its mean squared error)."""
    from .tasks.names import task_metric

    if not task_metric(cell.task.name).is_rate:
        name = f"{name} (MSE)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([name])


# -- proposals ----------------------------------------------------------------------------------

def _sampler_seed(spec: StudySpec, generation: int, variant: int) -> int:
    """The same in every cell (fair), distinct per generation and replacement variant."""
    return (spec.search.seed * 1_000_003 + generation * 7_919 + variant * 104_729) % 2**32


def grid_order(spec: StudySpec, cell: Cell) -> list[dict[str, float]]:
    """Every grid point of a cell once, in one order fixed by the search seed."""
    import numpy as np

    s = spec.search
    n = s.grid_points
    assert n is not None, "a grid search has grid_points (the spec validates it)"
    lrs = spec.search.lr.grid(n)
    wd = spec.weight_decay_range(cell.regularizer)
    points = ([{"lr": a, R.DECAY_AXES[wd.axis]: b} for a in lrs for b in wd.grid(n)] if wd
              else [{"lr": a} for a in lrs])
    order = np.random.default_rng(s.seed).permutation(len(points))
    return [points[i] for i in order]


def propose(spec: StudySpec, cell: Cell, history: list[FrozenTrial], generation: int, n: int,
            variant: int = 0) -> list[dict[str, float]]:
    """``n`` proposals for ``generation`` from the finished trials of earlier generations.

    A pure function of its arguments: the sampler is seeded by (search seed, generation,
    variant) and sees ``history`` in (generation, slot) order, so every worker that asks
    gets the same proposals.
    """
    s = spec.search
    if s.sampler == "grid":
        points = grid_order(spec, cell)
        return [points[generation * s.batch + i] for i in range(n)]  # a grid point is its own replacement
    seed = _sampler_seed(spec, generation, variant)
    if s.sampler == "random":
        sampler: optuna.samplers.BaseSampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        startup = s.startup_trials or min(10, max(1, (s.trials or 0) // 3))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, multivariate=True)
    dists = distributions(spec, cell)
    study = optuna.create_study(sampler=sampler, direction="minimize")  # in memory
    for t in sorted(history, key=_slot_key):
        study.add_trial(create_trial(
            state=t.state, value=t.value if t.state == TrialState.COMPLETE else None,
            params=t.params, distributions=dists, intermediate_values=t.intermediate_values,
        ))
    # asked trials stay RUNNING, which TPE without a constant liar ignores: all n come from one model
    return [study.ask(dists).params for _ in range(n)]


def _slot_key(t: FrozenTrial) -> tuple[int, int, int]:
    return R.RunRecord.of(t).slot_key


def ranked(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """Completed trials, best first; ties go to the earliest (generation, slot)."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and math.isfinite(t.value)]
    return sorted(done, key=lambda t: (t.value, _slot_key(t), t.number))


def race_standings(candidates: list[dict], trials: list[FrozenTrial]) -> list[dict]:
    """The race's result per candidate (in search rank order): its race runs' mean, their number,
    whether one diverged, and ``chosen`` for the single pick.

    The pick is the lowest mean among candidates that completed every race seed they ran
    without diverging; ties go to the better search rank. A candidate that diverged on a race
    seed is never picked: it would not be a configuration one can recommend.
    """
    out = []
    candidate_of = [R.RunRecord.of(t).candidate for t in trials]
    for i, cand in enumerate(candidates):
        runs = [t for t, c in zip(trials, candidate_of) if c == i]
        values = [t.value for t in runs if t.state == TrialState.COMPLETE and t.value is not None]
        diverged = any(t.state == TrialState.PRUNED for t in runs)
        out.append({**cand, "rank": i + 1, "race_values": values, "race_n": len(values), "diverged": diverged,
                    "race_mean": sum(values) / len(values) if values else math.nan, "chosen": False})
    eligible = [c for c in out if c["race_n"] and not c["diverged"]]
    if eligible:
        min(eligible, key=lambda c: (c["race_mean"], c["rank"]))["chosen"] = True
    return out


def best_trial(trials: list[FrozenTrial]) -> FrozenTrial | None:
    """The lowest objective among COMPLETE trials; ties go to the earliest (generation, slot)."""
    top = ranked(trials)
    return top[0] if top else None


class GenerationPruner(optuna.pruners.BasePruner):
    """Let ``inner`` judge a trial against trials of earlier generations only.

    Trials of the same generation run concurrently in any order; comparing with them
    would make the decision depend on timing.
    """

    def __init__(self, inner: optuna.pruners.BasePruner):
        self.inner = inner

    def prune(self, study: optuna.Study, trial: FrozenTrial) -> bool:
        # the pruners read a study's direction and trials only: a view of the earlier generations is one
        view = cast(optuna.Study, _EarlierGenerations(study, R.RunRecord.of(trial).slot_key[0]))
        return self.inner.prune(view, trial)


class _EarlierGenerations:
    """What a pruner sees of a study: its direction, and the trials of generations before ``g``."""

    def __init__(self, study: optuna.Study, generation: int):
        self._study = study
        self._generation = generation
        self.direction = study.direction

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if R.RunRecord.of(t).slot_key[0] < self._generation]


def pruner(spec: StudySpec, cell: Cell) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, cell.task.epochs // 5))
        return GenerationPruner(inner)
    return optuna.pruners.NopPruner()
