"""The three phases of a cell — search, race, evaluation — as objects with one small interface.

Each phase owns one Optuna study per cell (``CELL``, ``CELL/race``, ``CELL/eval``) and answers
the same questions for the engine (:class:`~wdstudy.cells.Cells`) and the worker
(:class:`~wdstudy.worker.Worker`):

- :meth:`Phase.open` — the phase's study, ready to run (created or repaired from the phase
  before it), or ``None`` when there is nothing to run;
- :meth:`Phase.advance` — queue what runs next (a generation, the race seeds, the open rounds of
  evaluation seeds) or re-queue a failed run; ``True`` if something was queued;
- :meth:`Phase.key` and :meth:`Phase.retry_attrs` — which unit a trial is an attempt of, and the
  user attributes of its next attempt (a failed search slot may get a replacement proposal, see
  :meth:`SearchPhase.replacement`);
- :meth:`Phase.plan` — what the worker trains for a reserved trial (:class:`RunPlan`).

A :class:`Unit` carries its phase, so neither the engine nor the worker dispatches on a string.
Everything here runs under the study lock and imports no torch.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import records as R
from .proposals import (
    FINISHED,
    best_trial,
    metric_names,
    propose,
    race_standings,
    ranked,
)
from .spec import Cell, StudySpec

if TYPE_CHECKING:
    from .cells import Cells


@dataclass(frozen=True)
class RunPlan:
    """What the worker trains for one unit: the seed, the splits measured, the metric returned."""

    label: str  #: how the run is named in the worker's log
    seed: int
    key: str  #: the metric returned to Optuna (the search objective, or ``test_error``)
    with_test: bool = False  #: measure the test split (evaluation only)
    history: bool = True  #: store the learning curve on the trial
    prune: bool = False  #: report each epoch to Optuna's pruner
    curve_as_steps: bool = False  #: without a pruner, store the curve as intermediate values afterwards


@dataclass
class Unit:
    """One reserved run: a trial of one phase of a cell, RUNNING and owned by this worker."""

    phase: Phase
    cell: Cell
    study: optuna.Study
    trial: optuna.Trial

    @property
    def kind(self) -> str:
        """``"search"``, ``"race"`` or ``"eval"``."""
        return self.phase.kind


def _by_candidate_seed(trials: list[FrozenTrial]) -> dict[tuple, list[FrozenTrial]]:
    runs: dict[tuple, list[FrozenTrial]] = defaultdict(list)
    for t in trials:
        r = R.RunRecord.of(t)
        runs[(r.candidate, r.seed)].append(t)
    return runs


def _attempts(ts: list[FrozenTrial]) -> list[FrozenTrial]:
    """A unit's trials without the copies queued twice and ended unrun (``duplicate``)."""
    return [t for t in ts if not R.duplicate(t)] or ts


def _candidates(race: optuna.Study) -> list[dict[str, Any]]:
    """A race study's candidates, set as it was opened (before any of its runs was queued)."""
    candidates = R.StudyRecord.of(race).candidates
    assert candidates is not None, f"race study {race.study_name} has no candidates"
    return candidates


def _failed_only(ts: list[FrozenTrial]) -> bool:
    """Every attempt failed and none was re-queued (its worker died between the two)."""
    return all(t.state == TrialState.FAIL for t in ts)


def _last(ts: list[FrozenTrial]) -> FrozenTrial:
    """The latest attempt (not a copy queued twice)."""
    return max(_attempts(ts), key=lambda t: t.number)


class Phase:
    """What the phases share; see the module docstring for the interface."""

    kind: ClassVar[str]

    def __init__(self, spec: StudySpec):
        self.spec = spec

    def study_name(self, cell: Cell) -> str:
        raise NotImplementedError

    def seeds(self, cell: Cell) -> StudySpec:
        """The spec with ``cell``'s replicate's seeds (search, race, evaluation)."""
        return self.spec.replica(cell.replicate)

    def open(self, cells: Cells, cell: Cell) -> optuna.Study | None:
        raise NotImplementedError

    def advance(self, cells: Cells, cell: Cell, study: optuna.Study, trials: list[FrozenTrial]) -> bool:
        raise NotImplementedError

    def pruner(self, cell: Cell) -> optuna.pruners.BasePruner:
        return optuna.pruners.NopPruner()

    def key(self, trial: FrozenTrial) -> tuple:
        """The unit a trial is an attempt of: (candidate, seed) for a race or evaluation run."""
        r = R.RunRecord.of(trial)
        return (r.candidate, r.seed)

    def retry_attrs(self, failed: FrozenTrial) -> dict[str, Any]:
        ua = failed.user_attrs
        return {R.SEED: ua.get(R.SEED), **({R.CANDIDATE: ua[R.CANDIDATE]} if R.CANDIDATE in ua else {})}

    def replacement(self, cell: Cell, failed: FrozenTrial, attrs: dict[str, Any],
                    trials: list[FrozenTrial]) -> dict[str, float] | None:
        """New parameters for a unit whose retries are spent, or None: it is given up."""
        return None

    def plan(self, unit: Unit) -> RunPlan:
        raise NotImplementedError


class SearchPhase(Phase):
    """The search: generations of ``search.batch`` proposals (see :mod:`wdstudy.cells`)."""

    kind = "search"

    def study_name(self, cell: Cell) -> str:
        return cell.name

    def open(self, cells: Cells, cell: Cell) -> optuna.Study | None:
        return cells.study(cell.name)

    def pruner(self, cell: Cell) -> optuna.pruners.BasePruner:
        from .proposals import pruner

        return pruner(self.spec, cell)

    def key(self, trial: FrozenTrial) -> tuple:
        from .proposals import _slot_key

        return _slot_key(trial)

    def retry_attrs(self, failed: FrozenTrial) -> dict[str, Any]:
        ua = failed.user_attrs
        return {R.GENERATION: ua[R.GENERATION], R.SLOT: ua[R.SLOT], R.VARIANT: ua.get(R.VARIANT, 0)}

    def replacement(self, cell: Cell, failed: FrozenTrial, attrs: dict[str, Any],
                    trials: list[FrozenTrial]) -> dict[str, float] | None:
        """The next variant's proposal for the slot, drawn from the same history with another seed."""
        from .cells import MAX_VARIANT

        if attrs[R.VARIANT] >= MAX_VARIANT:
            return None
        attrs[R.VARIANT] += 1
        generation, slot = attrs[R.GENERATION], attrs[R.SLOT]
        history = [t for t in trials if t.state in FINISHED and R.RunRecord.of(t).slot_key[0] < generation]
        return propose(self.seeds(cell), cell, history, generation, slot + 1, attrs[R.VARIANT])[slot]

    def advance(self, cells: Cells, cell: Cell, study: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Repair, or open the next generation; True if something was queued."""
        slots: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            r = R.RunRecord.of(t)
            if r.generation is not None:
                slots[r.slot_key[:2]].append(t)
        queued = False
        for _, ts in sorted(slots.items()):
            if _failed_only(ts):
                queued |= cells.requeue(study, _last(ts), trials)
        if queued:
            return True
        batch, budget = self.spec.search.batch, self.spec.budget(cell.regularizer)
        generation = max((g for g, _ in slots), default=-1)
        size = lambda g: min(batch, budget - g * batch)
        if generation < 0 or sum(1 for g, _ in slots if g == generation) >= size(generation):
            generation += 1  # the last generation is whole (and, here, finished): open the next
        if generation * batch >= budget:
            return False
        history = [t for t in trials if t.state in FINISHED and R.RunRecord.of(t).slot_key[0] < generation]
        for slot, params in enumerate(propose(self.seeds(cell), cell, history, generation, size(generation))):
            if (generation, slot) not in slots:
                study.enqueue_trial(params, user_attrs={R.GENERATION: generation, R.SLOT: slot})
                queued = True
        return queued

    def plan(self, unit: Unit) -> RunPlan:
        run, prune = R.RunRecord.from_attrs(unit.trial.user_attrs), self.spec.search.pruner != "none"
        return RunPlan(label=f"{unit.cell.name} trial {unit.trial.number} (generation {run.generation}, "
                             f"slot {run.slot})",
                       seed=self.seeds(unit.cell).search.seed, key=self.spec.search.objective, prune=prune,
                       curve_as_steps=not prune)


class RacePhase(Phase):
    """The race: the search's best ``top_k`` configurations, each on every race seed, scored on
    the validation split only."""

    kind = "race"

    def study_name(self, cell: Cell) -> str:
        return cell.race_name

    def open(self, cells: Cells, cell: Cell) -> optuna.Study | None:
        """The cell's race study, created with the search's best ``top_k`` configurations."""
        race = cells.study(cell.race_name)
        candidates = R.StudyRecord.of(race).candidates if race is not None else None
        if candidates is not None and cell.race_name in cells.checked:
            return race
        top = ranked(cells.existing(cell.name).get_trials(deepcopy=False))[: self.spec.selection.top_k]
        if candidates is not None:
            cells.checked.add(cell.race_name)  # once per view: a spec grows only between launches
            if [c["trial"] for c in candidates] == [t.number for t in top]:
                return race
            for name in (cell.race_name, cell.eval_name):  # a grown search found other candidates
                if cells.study(name) is not None:
                    cells.supersede(name)
            race = None
        if not top:
            return None  # nothing to race: no search trial completed
        if race is None:
            race = cells.existing_or_new(cell.race_name)
            metric_names(race, self.spec.search.objective, cell)
        race.set_user_attr(R.CANDIDATES, [{"trial": t.number, "params": t.params, "value": t.value} for t in top])
        cells.checked.add(cell.race_name)
        return race

    def advance(self, cells: Cells, cell: Cell, study: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Queue each (candidate, race seed) without a run, or re-queue a failed one."""
        runs = _by_candidate_seed(trials)
        queued = False
        for i, cand in enumerate(_candidates(study)):
            for seed in self.seeds(cell).selection.seed_list():
                ts = runs.get((i, seed))
                if not ts:
                    study.enqueue_trial(cand["params"], user_attrs={R.CANDIDATE: i, R.SEED: seed})
                    queued = True
                elif _failed_only(ts):
                    queued |= cells.requeue(study, _last(ts), trials)
        return queued

    def plan(self, unit: Unit) -> RunPlan:
        ua = unit.trial.user_attrs
        return RunPlan(label=f"{unit.cell.race_name} candidate {ua.get(R.CANDIDATE)} seed {int(ua[R.SEED])}",
                       seed=int(ua[R.SEED]), key=self.spec.search.objective, history=False)


class EvalPhase(Phase):
    """The evaluation: the chosen configuration (and, for an arm of a primary comparison, every
    race survivor) on the evaluation seeds of the open rounds, measured on the test split."""

    kind = "eval"

    def study_name(self, cell: Cell) -> str:
        return cell.eval_name

    def open(self, cells: Cells, cell: Cell) -> optuna.Study | None:
        """The cell's evaluation study, created with its chosen configuration (or repaired):
        the race's pick where the spec races, else the search's best trial."""
        ev = cells.study(cell.eval_name)
        if ev is not None and R.StudyRecord.of(ev).best_params is not None:
            if cell.eval_name in cells.checked:
                return ev
            cells.checked.add(cell.eval_name)  # once per view: a spec grows only between launches
            if self._still_chosen(cells, cell, ev):
                return ev
            cells.supersede(cell.eval_name)  # a grown race (or search) chose another configuration
            ev = None
        race_mean = None
        survivors: list[int] = []
        if self.spec.selection.races:
            race = cells.existing(cell.race_name)
            race_trials = race.get_trials(deepcopy=False)
            standings = race_standings(_candidates(race), race_trials)
            pick = next((c for c in standings if c["chosen"]), None)
            if pick is None:
                return None  # every candidate diverged or was given up: nothing to evaluate
            best_number, best_value, best_params = pick["trial"], pick["value"], pick["params"]
            race_mean = pick["race_mean"]
            survivors = self.survivors(cell, standings, pick["rank"] - 1, race_trials)
        else:
            best = best_trial(cells.existing(cell.name).get_trials(deepcopy=False))
            if best is None:
                return None  # nothing to evaluate: no search trial completed
            best_number, best_value, best_params = best.number, best.value, best.params
        if ev is None:
            ev = cells.existing_or_new(cell.eval_name)
            metric_names(ev, "test_error", cell)
        ev.set_user_attr(R.BEST_TRIAL, best_number)
        ev.set_user_attr(R.BEST_VALUE, best_value)
        if race_mean is not None:
            ev.set_user_attr(R.RACE_MEAN, race_mean)
            ev.set_user_attr(R.PICK, survivors[0])
            ev.set_user_attr(R.SURVIVORS, survivors)
        ev.set_user_attr(R.SEEDS_OPEN, self.spec.evaluation.looks()[0])
        ev.set_user_attr(R.BEST_PARAMS, best_params)  # last: its presence marks the study as complete
        cells.checked.add(cell.eval_name)
        return ev

    def _still_chosen(self, cells: Cells, cell: Cell, ev: optuna.Study) -> bool:
        """Whether ``ev`` still evaluates what the race (or the search) chooses now; raises its open
        seeds to a grown fixed number of evaluation seeds."""
        chosen = R.StudyRecord.of(ev)
        if self.spec.selection.races:
            race = cells.existing(cell.race_name)
            race_trials = race.get_trials(deepcopy=False)
            standings = race_standings(_candidates(race), race_trials)
            pick = next((c for c in standings if c["chosen"]), None)
            if pick is None or pick["trial"] != chosen.best_trial:
                return False
            if chosen.survivors is not None and chosen.survivors != self.survivors(cell, standings, pick["rank"] - 1,
                                                                                   race_trials):
                return False
        else:
            best = best_trial(cells.existing(cell.name).get_trials(deepcopy=False))
            if best is None or best.number != chosen.best_trial:
                return False
        looks = self.spec.evaluation.looks()
        if len(looks) == 1 and chosen.seeds_open_or(looks[0]) < looks[0]:
            ev.set_user_attr(R.SEEDS_OPEN, looks[0])  # more evaluation seeds: the new ones get queued
        return True

    def survivors(self, cell: Cell, standings: list[dict], pick: int, race_trials: list[FrozenTrial]) -> list[int]:
        """The pick, then (for an arm of a primary comparison) every candidate the race could not
        show worse than it by more than half the margin (:func:`wdstudy.decide.race_survivors`):
        each is evaluated too, so the decision can account for the luck of the pick."""
        from .decide import race_survivors
        from .tasks.names import task_metric

        if not any(cell.regularizer in pair for pair in self.spec.primary_pairs()):
            return [pick]
        seeds = self.seeds(cell).selection.seed_list()
        race = {i: [math.nan] * len(seeds) for i in range(len(standings))}
        sizes = []
        for t in race_trials:
            r = R.RunRecord.of(t)
            c, s = r.candidate, r.seed
            if t.state == TrialState.COMPLETE and t.value is not None and c is not None and s in seeds:
                race[int(c)][seeds.index(s)] = t.value
                sizes.append(r.val_size or 0)
        is_rate = task_metric(cell.task.name).is_rate
        resolution = 1.0 / max(sizes) if is_rate and sizes and max(sizes) > 0 else 0.0
        diverged = [i for i, c in enumerate(standings) if c["diverged"] or not c["race_n"]]
        out = race_survivors(race, pick, self.spec.decision.margin_for(is_rate), diverged=diverged,
                             alpha=self.spec.decision.alpha, resolution=resolution)
        return [pick] + [c for c in out if c != pick]

    def advance(self, cells: Cells, cell: Cell, study: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Queue each (survivor, seed) of the open rounds that has no run yet, or re-queue a failed one."""
        runs = _by_candidate_seed(trials)
        chosen = R.StudyRecord.of(study)
        assert chosen.best_params is not None, "an evaluation study is opened with its chosen configuration"
        params: dict[int | None, dict[str, Any]] = {None: chosen.best_params}
        if chosen.survivors:
            cands = _candidates(cells.existing(cell.race_name))
            params = {c: cands[c]["params"] for c in chosen.survivors}
        queued = False
        for seed in self.seeds(cell).evaluation.seed_list(chosen.seeds_open_or(self.spec.evaluation.max_seeds)):
            for cand, p in params.items():
                ts = runs.get((cand, seed))
                if not ts:
                    study.enqueue_trial(p, user_attrs={R.SEED: seed, **({} if cand is None else {R.CANDIDATE: cand})})
                    queued = True
                elif _failed_only(ts):
                    queued |= cells.requeue(study, _last(ts), trials)
        return queued

    def plan(self, unit: Unit) -> RunPlan:
        seed = int(unit.trial.user_attrs[R.SEED])
        return RunPlan(label=f"{unit.cell.eval_name} seed {seed}", seed=seed, key="test_error", with_test=True)


class Rounds:
    """Evaluation in rounds of seeds, shared by the arms of a task × optimizer's primary comparisons.

    A round opens only when every cell of the group has finished the previous one, and the
    decision that asks for it is computed from those finished runs alone: with 1 or 8
    workers, in any order, the same seeds run and the same decisions come out.
    """

    def __init__(self, spec: StudySpec, evaluation: EvalPhase):
        self.spec = spec
        self.evaluation = evaluation

    def group(self, cell: Cell) -> list[Cell]:
        """The cells whose decisions share rounds with ``cell``: the arms of the primary comparisons
        of its task × optimizer (empty if ``cell`` is in none)."""
        arms = {a for pair in self.spec.primary_pairs() for a in pair}
        if cell.regularizer not in arms:
            return []
        return [c for c in self.spec.cells() if c.task.name == cell.task.name
                and c.optimizer.name == cell.optimizer.name and c.regularizer in arms]

    def next_round(self, cells: Cells, cell: Cell) -> str:
        """After ``cell``'s open rounds are finished: ``"done"``, ``"wait"`` (another cell of its
        group is still running this round) or ``"opened"`` (the next round is queued for the group)."""
        looks = self.spec.evaluation.looks()
        group = self.group(cell)
        if len(looks) == 1 or not group:
            return "done"
        arms, n_open = self._finished_round(cells, group)
        if arms is None:
            return "wait"
        if n_open is None or len(arms) < 2 or n_open >= looks[-1]:
            return "done"
        from .tasks.names import task_metric
        from .verdicts import group_verdicts, settled

        d = self.spec.decision
        pairs = self.spec.primary_pairs()
        verdicts = group_verdicts(arms, pairs, pairs, margin=d.margin_for(task_metric(cell.task.name).is_rate),
                                  alpha=d.alpha, looks=looks, n_open=n_open)
        if settled(verdicts):
            return "done"
        nxt = next(n for n in looks if n > n_open)
        for c in group:  # every cell of the group moves on at once, its runs queued in this locked block
            ev = cells.existing(c.eval_name)
            ev.set_user_attr(R.SEEDS_OPEN, nxt)
            self.evaluation.advance(cells, c, ev, ev.get_trials(deepcopy=False))
        return "opened"

    def _finished_round(self, cells: Cells, group: list[Cell]) -> tuple[dict | None, int | None]:
        """Each arm's runs and the group's open seeds once every cell finished its open rounds;
        ``(None, None)`` while one is still running, queuing or being moved on."""
        from .verdicts import arm_runs

        looks = self.spec.evaluation.looks()
        arms: dict[str, Any] = {}
        n_open = None
        for c in group:
            ev = cells.study(c.eval_name)
            if ev is None or R.StudyRecord.of(ev).best_params is None:
                if cells.finished(c):  # finished with nothing to evaluate (no search trial completed)
                    continue
                return None, None
            if c.eval_name not in cells.checked:  # its own reservation checks it against a grown spec first
                return None, None
            trials = ev.get_trials(deepcopy=False)
            if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
                return None, None
            if self.evaluation.advance(cells, c, ev, trials):  # open rounds not all queued yet (or a run failed)
                return None, None
            opened = R.StudyRecord.of(ev).seeds_open_or(looks[0])
            if n_open is not None and opened != n_open:
                return None, None  # the group is being moved to the next round (repaired on the next call)
            n_open = opened
            race = cells.existing(c.race_name).get_trials(deepcopy=False) if self.spec.selection.races else None
            arms[c.regularizer] = arm_runs(self.spec.replica(c.replicate).selection.seed_list(), race, ev.user_attrs,
                                           trials)
        return arms, n_open
