"""Cells: their Optuna studies, their proposals in generations, and what runs next.

A cell (task × optimizer × regularizer) is one Optuna study; its evaluation runs are a
second study, ``CELL/eval``. Everything here runs in a worker (or the launcher) while it
holds the :class:`~wdstudy.storage.StudyLock`, and imports no torch.

**Generations.** A cell's search proposes its trials in generations of ``search.batch``
trials (a spec field, never derived from the number of workers). Generation ``g`` is
opened only when every trial of generations ``< g`` has finished; its proposals are drawn
at once from those finished trials alone, by a sampler seeded with (search seed, ``g``),
and queued as WAITING trials tagged with their generation and slot. Whichever worker runs
them, and in whatever order they finish, the proposals — and so, with the same threads per
worker, the values and the chosen configuration — are the same with 1 or 8 workers.
TPE therefore needs no constant liar, and the median pruner compares a trial only with
trials of earlier generations (:class:`GenerationPruner`). Workers fill the wait for a
generation's last trial with other cells' work.

**Retries.** A trial that fails — the run raised (``error``), or its worker died, was
stopped or let its lease expire (``lost``) — is re-queued with the same parameters, slot
and generation in the same locked block that failed it, so a cell's budget is exact. A slot
gives up on its parameters after :data:`MAX_RETRY` errors (or :data:`MAX_LOST` losses)
and is refilled with a replacement proposal (``variant`` 1, 2, drawn from the same history
with another seed); a slot whose :data:`MAX_VARIANT` replacements fail too is given up, as is
an evaluation seed after as many failures: the study ends short of its budget, the launch
exits 1 and the report counts what is missing, rather than retrying forever. Anything a crash could leave half done — a generation partly queued, a
failed trial not yet re-queued, an evaluation study without its configuration — is
repaired by :meth:`Cells.reserve` the next time it finds the cell idle.
"""

from __future__ import annotations

import math
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.distributions import FloatDistribution
from optuna.trial import FrozenTrial, TrialState, create_trial

from . import records as R
from .errors import WdstudyError
from .spec import Cell, StudySpec
from .storage import owner_tag, stale_reason

MAX_RETRY = 3  #: re-runs of a configuration whose run raised, before it is replaced (search) or given up (eval)
MAX_LOST = 10  #: re-runs of a configuration whose worker was lost (killed, stopped, lease expired)
MAX_VARIANT = 2  #: replacement proposals of a search slot; after those the slot is given up
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.WARNING)


# -- what a cell is ---------------------------------------------------------------------------

def cell_record(spec: StudySpec, cell: Cell) -> R.CellRecord:
    """What defines a cell; stored with its study (:meth:`~wdstudy.records.CellRecord.to_dict`),
    and checked again on resume.

    The task's ``precision`` is left out while it is the default (``32``), and so are the
    factory-task fields (``factory``, ``options``, ``accumulate_grad_batches``) while unset, so
    studies started before those fields existed still resume; a factory task's record holds
    its factory path and options, so changing either is a changed spec.
    """
    from .tasks import FACTORY_ONLY, LATER_FIELDS

    wd = spec.weight_decay_range(cell.regularizer)
    task = cell.task.model_dump(mode="json")
    if task.get("precision") == "32":
        del task["precision"]
    for key, default in {**FACTORY_ONLY, **LATER_FIELDS}.items():
        if task.get(key) == default:
            del task[key]
    looks = spec.evaluation.looks()
    return R.CellRecord(
        study=spec.name,
        task=task,
        optimizer=cell.optimizer.model_dump(mode="json"),
        regularizer=cell.regularizer,
        schedule=spec.schedule,
        decay_all=spec.decay_all,
        lr_range=(spec.search.lr.low, spec.search.lr.high),
        weight_decay_range=wd.lambda_range(spec.search.lr) if wd else None,
        # only when λ is not the searched axis, so records of λ-searched studies stay as they were
        decay_axis=(wd.axis, (wd.low, wd.high)) if wd and wd.axis != "lambda" else None,
        sampler=spec.search.sampler,
        budget=spec.budget(cell.regularizer),
        batch=spec.search.batch,
        pruner=spec.search.pruner,
        seed=spec.search.seed,
        objective=spec.search.objective,
        eval_seeds=tuple(eval_seeds(spec)),
        # only with rounds, so records of studies with a fixed number of seeds stay as they were
        eval_rounds=tuple(looks) if len(looks) > 1 else None,
        selection=R.Race(spec.selection.top_k, tuple(spec.selection.seed_list())) if spec.selection.races else None,
    )


def eval_seeds(spec: StudySpec) -> list[int]:
    """Every evaluation seed a cell may run (with rounds: up to ``max``)."""
    return spec.evaluation.seed_list()


def distributions(spec: StudySpec, cell: Cell) -> dict[str, FloatDistribution]:
    """The searched parameters of a cell: ``lr`` and (unless the arm is ``none``) the strength on
    its axis: ``weight_decay`` (λ), ``shrink`` or ``timescale`` (see ``records.DECAY_AXES``)."""
    out = {"lr": FloatDistribution(spec.search.lr.low, spec.search.lr.high, log=True)}
    wd = spec.weight_decay_range(cell.regularizer)
    if wd is not None:
        out[R.DECAY_AXES[wd.axis]] = FloatDistribution(wd.low, wd.high, log=True)
    return out


def _metric_names(study: optuna.Study, name: str, cell: Cell) -> None:
    """Name the objective, so the dashboard labels its axes with it (``val_error (MSE)`` for a
    regression task, whose error is its mean squared error)."""
    from .tasks.names import task_metric

    if not task_metric(cell.task.name).is_rate:
        name = f"{name} (MSE)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([name])


def ensure_studies(spec: StudySpec, storage, spec_yaml: str | None = None) -> None:
    """Create every cell's study (idempotent) and record what it is; refuse a changed spec."""
    versions = R.package_versions()
    for cell in spec.cells():
        study = optuna.create_study(study_name=cell.name, storage=storage, direction="minimize", load_if_exists=True)
        record = cell_record(spec, cell).to_dict()
        stored = study.user_attrs.get(R.CELL)
        if stored is None:
            _metric_names(study, spec.search.objective, cell)
            study.set_user_attr(R.CELL, record)
            study.set_user_attr(R.VERSIONS, versions)
            if spec_yaml is not None:
                study.set_user_attr(R.SPEC_YAML, spec_yaml)
        decision = decision_record(spec)
        if study.user_attrs.get(R.DECISION) != decision:
            study.set_user_attr(R.DECISION, decision)
        elif stored != record:
            changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
            raise WdstudyError(
                f"study {cell.name!r}: the spec changed since this study started "
                f"({', '.join(changed)} differ); use a new study name or output folder"
            )


def decision_record(spec: StudySpec) -> dict[str, Any]:
    """The decision settings the report applies (stored per cell, so a storage alone suffices)."""
    d = spec.decision
    return {"margin": d.margin, "mse_margin": d.mse_margin, "alpha": d.alpha,
            "primary": [list(p) for p in d.primary], "looks": spec.evaluation.looks()}


# -- proposals ----------------------------------------------------------------------------------

def _sampler_seed(spec: StudySpec, generation: int, variant: int) -> int:
    """The same in every cell (fair), distinct per generation and replacement variant."""
    return (spec.search.seed * 1_000_003 + generation * 7_919 + variant * 104_729) % 2**32


def grid_order(spec: StudySpec, cell: Cell) -> list[dict[str, float]]:
    """Every grid point of a cell once, in one order fixed by the search seed."""
    import numpy as np

    s = spec.search
    lrs = spec.search.lr.grid(s.grid_points)
    wd = spec.weight_decay_range(cell.regularizer)
    key = R.DECAY_AXES[wd.axis] if wd else None
    points = [{"lr": a, key: b} for a in lrs for b in wd.grid(s.grid_points)] if wd else [{"lr": a} for a in lrs]
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
        startup = s.startup_trials or min(10, max(1, s.trials // 3))
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
    return (t.user_attrs.get(R.GENERATION, 0), t.user_attrs.get(R.SLOT, 0), t.user_attrs.get(R.VARIANT, 0))


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
    for i, cand in enumerate(candidates):
        runs = [t for t in trials if t.user_attrs.get(R.CANDIDATE) == i]
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
        return self.inner.prune(_EarlierGenerations(study, trial.user_attrs.get(R.GENERATION, 0)), trial)


class _EarlierGenerations:
    """What a pruner sees of a study: its direction, and the trials of generations before ``g``."""

    def __init__(self, study: optuna.Study, generation: int):
        self._study = study
        self._generation = generation
        self.direction = study.direction

    def get_trials(self, deepcopy: bool = True, states=None) -> list[FrozenTrial]:
        return [t for t in self._study.get_trials(deepcopy=deepcopy, states=states)
                if t.user_attrs.get(R.GENERATION, 0) < self._generation]


def pruner(spec: StudySpec, cell: Cell) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "median":
        inner = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, cell.task.epochs // 5))
        return GenerationPruner(inner)
    return optuna.pruners.NopPruner()


# -- units of work -------------------------------------------------------------------------------

@dataclass
class Unit:
    """One reserved run: a search trial of a cell, or one evaluation seed of its chosen configuration."""

    kind: str  # "search" or "eval"
    cell: Cell
    study: optuna.Study
    trial: optuna.Trial


class Cells:
    """One worker's (or the launcher's) view of a study's cells over one storage.

    Call its methods while holding the study's :class:`~wdstudy.storage.StudyLock`.
    Cells whose search (or search and evaluation) is complete are remembered, so
    later reservations do not read them again.
    """

    def __init__(self, spec: StudySpec, storage: optuna.storages.BaseStorage):
        self.spec = spec
        self.storage = storage
        self._studies: dict[str, optuna.Study] = {}
        self._searched: set[str] = set()
        self._done: set[str] = set()
        self.taken: tuple[optuna.Study, int] | None = None

    # -- studies
    def study(self, name: str, create: bool = False) -> optuna.Study | None:
        if name not in self._studies:
            try:
                study = optuna.load_study(study_name=name, storage=self.storage,
                                          sampler=optuna.samplers.RandomSampler())
            except KeyError:
                if not create:
                    return None
                study = optuna.create_study(study_name=name, storage=self.storage, direction="minimize",
                                            load_if_exists=True, sampler=optuna.samplers.RandomSampler())
            self._studies[name] = study
        return self._studies[name]

    # -- reservation
    def reserve(self) -> tuple[Unit | None, bool]:
        """Take the next runnable unit in any cell; returns ``(unit, every_cell_finished)``.

        The unit's trial is RUNNING, owned by this process and leased; run it outside
        the lock.
        """
        finished = True
        for cell in self.spec.cells():
            if cell.name in self._done:
                continue
            unit, cell_done = self._reserve_in(cell)
            if unit is not None:
                return unit, False
            if cell_done:
                self._done.add(cell.name)
            else:
                finished = False
        return None, finished

    def _reserve_in(self, cell: Cell) -> tuple[Unit | None, bool]:
        search = self.study(cell.name)
        if search is None:
            raise WdstudyError(f"study {cell.name!r} is missing from the storage (was it launched with this spec?)")
        if cell.name not in self._searched:
            unit, idle = self._take_or_advance(cell, search, "search")
            if unit is not None or not idle:
                return unit, False
            self._searched.add(cell.name)
        race = None
        if self.spec.selection.races:
            race = self._race_study(cell, search)
            if race is None:
                return None, True  # nothing to race: no search trial completed
            unit, idle = self._take_or_advance(cell, race, "race")
            if unit is not None or not idle:
                return unit, False
        ev = self._eval_study(cell, search, race)
        if ev is None:
            return None, True  # nothing to evaluate: no search trial completed
        unit, idle = self._take_or_advance(cell, ev, "eval")
        if unit is not None or not idle:
            return unit, False
        state = self._next_round(cell)
        if state == "opened":
            unit, idle = self._take_or_advance(cell, ev, "eval")
            return unit, False
        return None, state == "done"

    def _take_or_advance(self, cell: Cell, study: optuna.Study, kind: str) -> tuple[Unit | None, bool]:
        """A WAITING trial of ``study`` reserved, or (None, True) when it has nothing left to run."""
        trials = study.get_trials(deepcopy=False)
        if self._release_stale(study, [t for t in trials if t.state == TrialState.RUNNING]):
            trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return self._take(cell, study, kind), False
        if any(t.state == TrialState.RUNNING for t in trials):
            return None, False
        advance = {"search": lambda: self._advance_search(cell, study, trials),
                   "race": lambda: self._advance_race(study, trials), "eval": lambda: self._advance_eval(study, trials)}
        queued = advance[kind]()
        if queued:
            return self._take(cell, study, kind), False
        return None, True

    def _take(self, cell: Cell, study: optuna.Study, kind: str) -> Unit:
        study.pruner = pruner(self.spec, cell) if kind == "search" else optuna.pruners.NopPruner()
        trial = study.ask(distributions(self.spec, cell))
        self.taken = (study, trial._trial_id)  # RUNNING, not yet tagged: failed if the tagging is cut off
        study._storage.set_trial_system_attr(trial._trial_id, R.OWNER, owner_tag())
        study._storage.set_trial_system_attr(trial._trial_id, R.LEASE, time.time())
        self.taken = None
        return Unit(kind, cell, study, trial)

    # -- search: generations
    def _advance_search(self, cell: Cell, study: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Repair, or open the next generation; True if something was queued."""
        slots: dict[tuple[int, int], list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            if R.GENERATION in t.user_attrs:
                slots[(t.user_attrs[R.GENERATION], t.user_attrs[R.SLOT])].append(t)
        queued = False
        for key, ts in sorted(slots.items()):
            if all(t.state == TrialState.FAIL for t in ts):  # failed, never re-queued (its worker died there)
                queued |= self._requeue(study, max(ts, key=lambda t: t.number), trials)
        if queued:
            return True
        batch, budget = self.spec.search.batch, self.spec.budget(cell.regularizer)
        generation = max((g for g, _ in slots), default=-1)
        size = lambda g: min(batch, budget - g * batch)  # noqa: E731
        if generation < 0 or sum(1 for g, _ in slots if g == generation) >= size(generation):
            generation += 1  # the last generation is whole (and, here, finished): open the next
        if generation * batch >= budget:
            return False
        history = [t for t in trials if t.state in FINISHED and t.user_attrs.get(R.GENERATION, 0) < generation]
        proposals = propose(self.spec, cell, history, generation, size(generation))
        for slot, params in enumerate(proposals):
            if (generation, slot) not in slots:
                study.enqueue_trial(params, user_attrs={R.GENERATION: generation, R.SLOT: slot})
                queued = True
        return queued

    # -- race
    def _race_study(self, cell: Cell, search: optuna.Study) -> optuna.Study | None:
        """The cell's race study, created with the search's best ``top_k`` configurations."""
        race = self.study(cell.race_name)
        if race is not None and R.CANDIDATES in race.user_attrs:
            return race
        top = ranked(search.get_trials(deepcopy=False))[: self.spec.selection.top_k]
        if not top:
            return None
        if race is None:
            race = self.study(cell.race_name, create=True)
            _metric_names(race, self.spec.search.objective, cell)
        race.set_user_attr(R.CANDIDATES, [{"trial": t.number, "params": t.params, "value": t.value} for t in top])
        return race

    def _advance_race(self, race: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Queue each (candidate, race seed) without a run, or re-queue a failed one."""
        runs: dict[tuple, list[FrozenTrial]] = defaultdict(list)
        for t in trials:
            runs[(t.user_attrs.get(R.CANDIDATE), t.user_attrs.get(R.SEED))].append(t)
        queued = False
        for i, cand in enumerate(race.user_attrs[R.CANDIDATES]):
            for seed in self.spec.selection.seed_list():
                ts = runs.get((i, seed))
                if not ts:
                    race.enqueue_trial(cand["params"], user_attrs={R.CANDIDATE: i, R.SEED: seed})
                    queued = True
                elif all(t.state == TrialState.FAIL for t in ts):
                    queued |= self._requeue(race, max(ts, key=lambda t: t.number), trials)
        return queued

    # -- evaluation
    def _eval_study(self, cell: Cell, search: optuna.Study, race: optuna.Study | None = None) -> optuna.Study | None:
        """The cell's evaluation study, created with its chosen configuration (or repaired):
        the race's pick where the spec races, else the search's best trial."""
        ev = self.study(cell.eval_name)
        if ev is not None and R.BEST_PARAMS in ev.user_attrs:
            return ev
        race_mean = None
        survivors: list[int] = []
        if race is not None:
            race_trials = race.get_trials(deepcopy=False)
            standings = race_standings(race.user_attrs[R.CANDIDATES], race_trials)
            pick = next((c for c in standings if c["chosen"]), None)
            if pick is None:
                return None  # every candidate diverged or was given up: nothing to evaluate
            best_number, best_value, best_params = pick["trial"], pick["value"], pick["params"]
            race_mean = pick["race_mean"]
            survivors = self._survivors(cell, standings, pick["rank"] - 1, race_trials)
        else:
            best = best_trial(search.get_trials(deepcopy=False))
            if best is None:
                return None
            best_number, best_value, best_params = best.number, best.value, best.params
        if ev is None:
            ev = self.study(cell.eval_name, create=True)
            _metric_names(ev, "test_error", cell)
        ev.set_user_attr(R.BEST_TRIAL, best_number)
        ev.set_user_attr(R.BEST_VALUE, best_value)
        if race_mean is not None:
            ev.set_user_attr(R.RACE_MEAN, race_mean)
            ev.set_user_attr(R.PICK, survivors[0])
            ev.set_user_attr(R.SURVIVORS, survivors)
        ev.set_user_attr(R.SEEDS_OPEN, self.spec.evaluation.looks()[0])
        ev.set_user_attr(R.BEST_PARAMS, best_params)  # last: its presence marks the study as complete
        return ev

    def _survivors(self, cell: Cell, standings: list[dict], pick: int, race_trials: list[FrozenTrial]) -> list[int]:
        """The pick, then (for an arm of a primary comparison) every candidate the race could not
        show worse than it by more than half the margin (:func:`wdstudy.decide.race_survivors`):
        each is evaluated too, so the decision can account for the luck of the pick."""
        from .decide import race_survivors
        from .tasks.names import task_metric

        if not any(cell.regularizer in pair for pair in self.spec.primary_pairs()):
            return [pick]
        seeds = self.spec.selection.seed_list()
        race = {i: [math.nan] * len(seeds) for i in range(len(standings))}
        sizes = []
        for t in race_trials:
            c, s = t.user_attrs.get(R.CANDIDATE), t.user_attrs.get(R.SEED)
            if t.state == TrialState.COMPLETE and t.value is not None and s in seeds:
                race[c][seeds.index(s)] = t.value
                sizes.append(t.user_attrs.get("val_size") or 0)
        is_rate = task_metric(cell.task.name).is_rate
        resolution = 1.0 / max(sizes) if is_rate and sizes and max(sizes) > 0 else 0.0
        diverged = [i for i, c in enumerate(standings) if c["diverged"] or not c["race_n"]]
        out = race_survivors(race, pick, self.spec.decision.margin_for(is_rate), diverged=diverged,
                             alpha=self.spec.decision.alpha, resolution=resolution)
        return [pick] + [c for c in out if c != pick]

    def _advance_eval(self, ev: optuna.Study, trials: list[FrozenTrial]) -> bool:
        """Queue each (survivor, seed) of the open rounds that has no run yet, or re-queue a failed one."""
        runs: dict[tuple, list[FrozenTrial]] = defaultdict(list)
        attrs = ev.user_attrs
        for t in trials:
            runs[(t.user_attrs.get(R.CANDIDATE), t.user_attrs.get(R.SEED))].append(t)
        survivors = attrs.get(R.SURVIVORS)
        params = {None: attrs[R.BEST_PARAMS]}
        if survivors:
            cands = self.study(ev.study_name[: -len("/eval")] + "/race").user_attrs[R.CANDIDATES]
            params = {c: cands[c]["params"] for c in survivors}
        queued = False
        for seed in self.spec.evaluation.seed_list(attrs.get(R.SEEDS_OPEN, self.spec.evaluation.max_seeds)):
            for cand, p in params.items():
                ts = runs.get((cand, seed))
                if not ts:
                    ev.enqueue_trial(p, user_attrs={R.SEED: seed, **({} if cand is None else {R.CANDIDATE: cand})})
                    queued = True
                elif all(t.state == TrialState.FAIL for t in ts):
                    queued |= self._requeue(ev, max(ts, key=lambda t: t.number), trials)
        return queued

    # -- evaluation rounds
    def _group(self, cell: Cell) -> list[Cell]:
        """The cells whose decisions share rounds with ``cell``: the arms of the primary comparisons
        of its task × optimizer (empty if ``cell`` is in none)."""
        arms = {a for pair in self.spec.primary_pairs() for a in pair}
        if cell.regularizer not in arms:
            return []
        return [c for c in self.spec.cells() if c.task.name == cell.task.name
                and c.optimizer.name == cell.optimizer.name and c.regularizer in arms]

    def _next_round(self, cell: Cell) -> str:
        """After ``cell``'s open rounds are finished: ``"done"``, ``"wait"`` (another cell of its
        group is still running this round) or ``"opened"`` (the next round is queued for the group).

        A round opens only when every cell of the group has finished the previous one, and the
        decision that asks for it is computed from those finished runs alone: with 1 or 8
        workers, in any order, the same seeds run and the same decisions come out.
        """
        looks = self.spec.evaluation.looks()
        group = self._group(cell)
        if len(looks) == 1 or not group:
            return "done"
        arms, n_open = {}, None
        for c in group:
            ev = self.study(c.eval_name)
            if ev is None or R.BEST_PARAMS not in ev.user_attrs:
                if c.name in self._done:  # finished with nothing to evaluate (no search trial completed)
                    continue
                return "wait"
            trials = ev.get_trials(deepcopy=False)
            if any(t.state in (TrialState.WAITING, TrialState.RUNNING) for t in trials):
                return "wait"
            if self._advance_eval(ev, trials):  # its open rounds are not all queued yet (or a run failed)
                return "wait"
            opened = ev.user_attrs.get(R.SEEDS_OPEN, looks[0])
            if n_open is not None and opened != n_open:
                return "wait"  # the group is being moved to the next round (repaired on the next call)
            n_open = opened
            race = self.study(c.race_name) if self.spec.selection.races else None
            arms[c.regularizer] = self._arm_runs(race, ev, trials)
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
            ev = self.study(c.eval_name)
            ev.set_user_attr(R.SEEDS_OPEN, nxt)
            self._advance_eval(ev, ev.get_trials(deepcopy=False))
        return "opened"

    def _arm_runs(self, race: optuna.Study | None, ev: optuna.Study, trials: list[FrozenTrial]):
        from .verdicts import arm_runs

        return arm_runs(self.spec.selection.seed_list(), race.get_trials(deepcopy=False) if race else None,
                        ev.user_attrs, trials)

    # -- failures
    def fail(self, study: optuna.Study, trial_id: int, reason: str, kind: str) -> None:
        """End a RUNNING trial FAIL with its reason and re-queue it (or its replacement)."""
        storage = study._storage
        try:
            if storage.get_trial(trial_id).state != TrialState.RUNNING:
                return  # finished meanwhile (e.g. failed by another worker after a lease expired)
            storage.set_trial_system_attr(trial_id, R.FAIL_REASON, reason)
            storage.set_trial_system_attr(trial_id, R.FAIL_KIND, kind)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        self._requeue(study, storage.get_trial(trial_id), study.get_trials(deepcopy=False))

    def _requeue(self, study: optuna.Study, failed: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        """Queue the next attempt of ``failed``'s slot or seed; False if it is given up."""
        ua = failed.user_attrs
        if R.GENERATION in ua:
            same = [t for t in trials if t.state == TrialState.FAIL and _slot_key(t) == _slot_key(failed)]
            attrs = {R.GENERATION: ua[R.GENERATION], R.SLOT: ua[R.SLOT], R.VARIANT: ua.get(R.VARIANT, 0)}
        else:  # an evaluation seed, or a race run: (candidate, seed)
            key = (ua.get(R.CANDIDATE), ua.get(R.SEED))
            same = [t for t in trials if t.state == TrialState.FAIL
                    and (t.user_attrs.get(R.CANDIDATE), t.user_attrs.get(R.SEED)) == key]
            attrs = {R.SEED: ua.get(R.SEED), **({R.CANDIDATE: ua[R.CANDIDATE]} if R.CANDIDATE in ua else {})}
        if all(t.number != failed.number for t in same):
            same.append(failed)
        errors = sum(t.system_attrs.get(R.FAIL_KIND) == R.ERROR for t in same)
        params = failed.params
        if errors > MAX_RETRY or len(same) - errors > MAX_LOST:
            if R.GENERATION not in ua or attrs[R.VARIANT] >= MAX_VARIANT:
                return False  # given up (and reported): an evaluation seed, or a slot whose every proposal fails
            attrs[R.VARIANT] += 1
            cell = next(c for c in self.spec.cells() if c.name == study.study_name)
            history = [t for t in trials if t.state in FINISHED and t.user_attrs.get(R.GENERATION, 0) < ua[R.GENERATION]]
            params = propose(self.spec, cell, history, ua[R.GENERATION], ua[R.SLOT] + 1, attrs[R.VARIANT])[ua[R.SLOT]]
        if not attrs.get(R.VARIANT, 1):
            del attrs[R.VARIANT]
        study.enqueue_trial(params, user_attrs=attrs)
        return True

    def _release_stale(self, study: optuna.Study, running: list[FrozenTrial], dead_pids=None) -> int:
        now = time.time()
        released = 0
        for t in running:
            reason = stale_reason(t, now, dead_pids)
            if reason is not None:
                self.fail(study, t._trial_id, reason, R.LOST)
                released += 1
        return released

    def release_dead(self, dead_pids=None) -> int:
        """Fail and re-queue every stale RUNNING trial of the study (of ``dead_pids`` only, if given)."""
        released = 0
        existing = {s.study_name for s in self.storage.get_all_studies()}
        for name in self.spec.study_names():
            if name in existing:
                study = self.study(name)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                released += self._release_stale(study, running, dead_pids)
        return released
