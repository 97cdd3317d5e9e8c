"""Cells: their Optuna studies, and the engine that says what runs next.

A cell (task × optimizer × regularizer) is one Optuna study; its race runs and its evaluation
runs are two more, ``CELL/race`` and ``CELL/eval``. What each of the three phases queues and
runs is its :mod:`~wdstudy.phases` object's; the proposals are :mod:`~wdstudy.proposals`'.
Everything here runs in a worker (or the launcher) while it holds the
:class:`~wdstudy.storage.StudyLock`, and imports no torch.

**Generations.** A cell's search proposes its trials in generations of ``search.batch``
trials (a spec field, never derived from the number of workers). Generation ``g`` is
opened only when every trial of generations ``< g`` has finished; its proposals are drawn
at once from those finished trials alone, by a sampler seeded with (search seed, ``g``),
and queued as WAITING trials tagged with their generation and slot. Whichever worker runs
them, and in whatever order they finish, the proposals — and so, with the same threads per
worker, the values and the chosen configuration — are the same with 1 or 8 workers.
TPE therefore needs no constant liar, and the median pruner compares a trial only with
trials of earlier generations (:class:`~wdstudy.proposals.GenerationPruner`). Workers fill the wait for a
generation's last trial with other cells' work.

**Retries.** A trial that fails — the run raised (``error``), or its worker died, was
stopped or let its lease expire (``lost``) — is re-queued with the same parameters, slot
and generation in the same locked block that failed it, so a cell's budget is exact. A slot
gives up on its parameters after :data:`MAX_RETRY` errors (or :data:`MAX_LOST` losses; a stop
by a storage that cannot be written, ``storage``, is no failure of the run and counts as neither)
and is refilled with a replacement proposal (``variant`` 1, 2, drawn from the same history
with another seed); a slot whose :data:`MAX_VARIANT` replacements fail too is given up, as is
an evaluation seed after as many failures: the study ends short of its budget, the launch
exits 1 and the report counts what is missing, rather than retrying forever. Anything a
crash could leave half done — a generation partly queued, a failed trial not yet re-queued,
an evaluation study without its configuration — is repaired by :meth:`Cells.reserve` the next
time it finds the cell idle.
"""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from . import records as R
from .errors import WdstudyError
from .phases import EvalPhase, Phase, RacePhase, Rounds, SearchPhase, Unit
from .proposals import distributions, metric_names
from .spec import Cell, StudySpec
from .storage import owner_tag, stale_reason, storage_of, trial_id

MAX_RETRY = 3  #: re-runs of a configuration whose run raised, before it is replaced (search) or given up (eval)
MAX_LOST = 10  #: re-runs of a configuration whose worker was lost (killed, stopped, lease expired)
MAX_VARIANT = 2  #: replacement proposals of a search slot; after those the slot is given up

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

    spec = spec.replica(cell.replicate)  # a replicate's own seeds
    wd = spec.weight_decay_range(cell.regularizer)
    task = cell.task.model_dump(mode="json")
    if task.get("precision") == "32":
        del task["precision"]
    for key, default in {**FACTORY_ONLY, **LATER_FIELDS}.items():
        if task.get(key) == default:
            del task[key]
    looks = spec.evaluation.looks()
    # a timescale in epochs converts to λ with the task's steps per epoch: the record keeps it
    steps = cell.task.steps_per_epoch if wd and wd.axis == "timescale_epochs" else None
    return R.CellRecord(
        study=spec.name,
        task=task,
        optimizer=cell.optimizer.model_dump(mode="json"),
        regularizer=cell.regularizer,
        schedule=spec.schedule,
        decay_all=spec.decay_all,
        lr_range=(spec.search.lr.low, spec.search.lr.high),
        weight_decay_range=wd.lambda_range(spec.search.lr, steps) if wd else None,
        # only when λ is not the searched axis, so records of λ-searched studies stay as they were
        decay_axis=(wd.axis, (wd.low, wd.high)) if wd and wd.axis != "lambda" else None,
        steps_per_epoch=steps,
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
        replicate=cell.replicate,
    )


def eval_seeds(spec: StudySpec) -> list[int]:
    """Every evaluation seed a cell may run (with rounds: up to ``max``)."""
    return spec.evaluation.seed_list()


#: record keys a spec may raise on a stored study (it resumes, grown); any other change is refused
GROWABLE = ("budget", "selection", "eval_seeds", "eval_rounds")


def grows(stored: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether ``record`` only grows ``stored`` (both stored mappings): more search trials, race
    seeds or evaluation seeds (each stored seed kept, in its place), nothing else changed."""
    changed = {k for k in set(stored) | set(record) if stored.get(k) != record.get(k)}
    if not changed or not changed <= set(GROWABLE):
        return False
    old, new = R.CellRecord.from_dict(stored), R.CellRecord.from_dict(record)
    if (old.selection is None) != (new.selection is None):
        return False
    if old.selection and new.selection and (old.selection.top_k != new.selection.top_k
                                            or new.selection.seeds[: len(old.selection.seeds)] != old.selection.seeds):
        return False
    return new.budget >= old.budget and new.eval_seeds[: len(old.eval_seeds)] == old.eval_seeds


def ensure_studies(spec: StudySpec, storage, spec_yaml: str | None = None) -> list[str]:
    """Create every cell's study (idempotent) and record what it is; refuse a changed spec.

    A spec that only raises ``search.trials``, ``selection.seeds`` or ``evaluation.seeds``
    grows the study: its record is updated and the engine runs what is missing (a race or an
    evaluation whose candidates changed is redone, the old runs kept; see :meth:`Cells.supersede`).
    Returns the names of the cells that grew.
    """
    versions = R.package_versions()
    grown = []
    for cell in spec.cells():
        study = optuna.create_study(study_name=cell.name, storage=storage, direction="minimize", load_if_exists=True)
        record = cell_record(spec, cell).to_dict()
        stored = study.user_attrs.get(R.CELL)
        if stored is None:
            metric_names(study, spec.search.objective, cell)
            study.set_user_attr(R.CELL, record)
            study.set_user_attr(R.VERSIONS, versions)
            if spec_yaml is not None:
                study.set_user_attr(R.SPEC_YAML, spec_yaml)
        elif stored != record:
            if not grows(stored, record):
                changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
                raise WdstudyError(
                    f"study {cell.name!r}: the spec changed since this study started "
                    f"({', '.join(changed)} differ); only search.trials, selection.seeds and evaluation.seeds "
                    "may grow on a stored study: use a new study name or output folder"
                )
            study.set_user_attr(R.CELL, record)
            if spec_yaml is not None:
                study.set_user_attr(R.SPEC_YAML, spec_yaml)
            grown.append(cell.name)
        decision = decision_record(spec)
        if study.user_attrs.get(R.DECISION) != decision:
            study.set_user_attr(R.DECISION, decision)
    return grown


def spec_drift(spec: StudySpec, storage) -> str | None:
    """A sentence saying how the spec on disk differs from the stored study, or None if it does not
    (or nothing is stored yet): ``status`` and ``report`` show the stored study either way."""
    stored = {s.study_name: s.user_attrs.get(R.CELL) for s in storage.get_all_studies()}
    changed: set[str] = set()
    cells = [c for c in spec.cells() if stored.get(c.name) is not None]
    growing = True
    for cell in cells:
        old, new = stored[cell.name], cell_record(spec, cell).to_dict()
        if old != new:
            changed |= {k for k in set(old) | set(new) if old.get(k) != new.get(k)}
            growing &= grows(old, new)
    missing = len(spec.cells()) - len(cells)
    if not changed and (not missing or not cells):
        return None
    what = [f"{', '.join(sorted(changed))} {'differs' if len(changed) == 1 else 'differ'}"] if changed else []
    what += [f"{missing} of its cells are not stored"] if missing else []
    then = ("`launch` grows the study to it" if growing and not missing else
            "`launch` would refuse it: use a new study name or output folder")
    return (f"the spec on disk differs from the stored study {spec.name!r} ({'; '.join(what)}): "
            f"showing the stored study; {then}")


def decision_record(spec: StudySpec) -> dict[str, Any]:
    """The decision settings the report applies (stored per cell, so a storage alone suffices)."""
    d = spec.decision
    return {"margin": d.margin, "mse_margin": d.mse_margin, "alpha": d.alpha,
            "primary": [list(p) for p in d.primary], "looks": spec.evaluation.looks()}


# -- the engine ----------------------------------------------------------------------------------

def _queued(trial: FrozenTrial) -> bool:
    """Whether ``trial`` was queued by the engine as an attempt of a unit (a search slot, a seed)."""
    return R.GENERATION in trial.user_attrs or R.SEED in trial.user_attrs


class Retries:
    """What becomes of a failed unit: :meth:`fail` ends it FAIL with its reason and re-queues it (or
    its replacement, or gives it up); :meth:`release_dead` does so for the trials of dead or
    silent workers. A base of :class:`Cells`, whose studies and phases it uses."""

    spec: StudySpec
    storage: optuna.storages.BaseStorage
    _owner: dict[str, tuple[Phase, Cell]]

    def existing(self, name: str) -> optuna.Study:
        raise NotImplementedError

    def fail(self, study: optuna.Study, trial_id: int, reason: str, kind: str) -> None:
        """End a RUNNING trial FAIL with its reason and re-queue it (or its replacement)."""
        storage = storage_of(study)
        try:
            if storage.get_trial(trial_id).state != TrialState.RUNNING:
                return  # finished meanwhile (e.g. failed by another worker after a lease expired)
            storage.set_trial_system_attr(trial_id, R.FAIL_REASON, reason)
            storage.set_trial_system_attr(trial_id, R.FAIL_KIND, kind)
            if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
                return
        except optuna.exceptions.UpdateFinishedTrialError:
            return
        self.requeue(study, storage.get_trial(trial_id), study.get_trials(deepcopy=False))

    def requeue(self, study: optuna.Study, failed: FrozenTrial, trials: list[FrozenTrial]) -> bool:
        """Queue the next attempt of ``failed``'s unit (its phase says which); False if it is given up.

        After :data:`MAX_RETRY` errors or :data:`MAX_LOST` losses the unit gets its phase's
        replacement (a search slot's next proposal) or, without one, is given up; failures of kind
        :data:`~wdstudy.records.STORAGE` (a full disk stopped the worker) count as neither.
        """
        phase, cell = self._owner[study.study_name]
        key = phase.key(failed)
        same = [t for t in trials if t.state == TrialState.FAIL and phase.key(t) == key]
        if all(t.number != failed.number for t in same):
            same.append(failed)
        # an unrun second copy and a stop by a full disk are no failures of the run
        same = [t for t in same if not R.duplicate(t) and t.system_attrs.get(R.FAIL_KIND) != R.STORAGE]
        attrs = phase.retry_attrs(failed)
        params: dict[str, Any] = failed.params
        errors = sum(t.system_attrs.get(R.FAIL_KIND) == R.ERROR for t in same)
        if errors > MAX_RETRY or len(same) - errors > MAX_LOST:
            replacement = phase.replacement(cell, failed, attrs, trials)
            if replacement is None:
                return False  # given up (and reported): its study ends short of its budget
            params = replacement
        if not attrs.get(R.VARIANT, 1):
            del attrs[R.VARIANT]
        study.enqueue_trial(params, user_attrs=attrs)
        return True

    def end_duplicates(self, study: optuna.Study, phase: Phase, trials: list[FrozenTrial]) -> int:
        """End FAIL (kind :data:`~wdstudy.records.DUPLICATE`), unrun, every WAITING trial whose unit
        already has another attempt that runs, finished, or waits queued earlier; returns how many.

        A unit is queued twice when the storage kept a trial's creation whose answer was lost: Optuna's
        RDB storage creates the trial again by itself, and a lock lost in the same outage lets another
        worker queue it too. Each unit has at most one attempt that is not FAIL; this restores that
        before anything is reserved, whatever the interleaving.
        """
        keep: dict[tuple, FrozenTrial] = {}
        for t in sorted(trials, key=lambda t: (t.state == TrialState.WAITING, t.number)):
            if t.state != TrialState.FAIL and _queued(t):
                keep.setdefault(phase.key(t), t)
        storage = storage_of(study)
        ended = 0
        for t in trials:
            if t.state != TrialState.WAITING or not _queued(t) or keep[phase.key(t)] is t:
                continue
            tid = trial_id(t)
            storage.set_trial_system_attr(tid, R.FAIL_REASON, f"queued twice: trial {keep[phase.key(t)].number} "
                                          "is this unit's attempt")
            storage.set_trial_system_attr(tid, R.FAIL_KIND, R.DUPLICATE)
            try:
                storage.set_trial_state_values(tid, TrialState.FAIL)
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            ended += 1
        return ended

    def _release_stale(self, study: optuna.Study, running: list[FrozenTrial], dead_pids=None,
                       why: str | None = None, kind: str = R.LOST) -> int:
        now = time.time()
        released = 0
        for t in running:
            reason = stale_reason(t, now, dead_pids)
            if reason is not None:
                self.fail(study, trial_id(t), f"{reason}; {why}" if why else reason, kind)
                released += 1
        return released

    def release_dead(self, dead_pids=None, why: str | None = None, kind: str = R.LOST) -> int:
        """Fail and re-queue every stale RUNNING trial of the study (of ``dead_pids`` only, if given);
        ``why`` (added to each reason) and ``kind``: a launch that stopped its pool for a full disk."""
        released = 0
        existing = {s.study_name for s in self.storage.get_all_studies()}
        for name in self.spec.study_names():
            if name in existing:
                study = self.existing(name)
                running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                released += self._release_stale(study, running, dead_pids, why, kind)
        return released


class Cells(Retries):
    """One worker's (or the launcher's) view of a study's cells over one storage: which unit runs
    next (:meth:`reserve`), and what becomes of a failed one (:meth:`fail`).

    The work of each phase — what to queue, how a unit is keyed, what the worker trains — is
    its :class:`~wdstudy.phases.Phase`'s. Call these methods while holding the study's
    :class:`~wdstudy.storage.StudyLock`. Cells whose search (or whole work) is complete are
    remembered, so later reservations do not read them again.
    """

    def __init__(self, spec: StudySpec, storage: optuna.storages.BaseStorage):
        self.spec = spec
        self.storage = storage
        self.search, self.evaluation = SearchPhase(spec), EvalPhase(spec)
        self.phases: list[Phase] = [self.search, *([RacePhase(spec)] if spec.selection.races else []),
                                    self.evaluation]
        self.rounds = Rounds(spec, self.evaluation)
        self._owner = {p.study_name(c): (p, c) for c in spec.cells() for p in self.phases}
        self._studies: dict[str, optuna.Study] = {}
        self._searched: set[str] = set()
        self._done: set[str] = set()
        self.checked: set[str] = set()  #: phase studies checked against a grown spec by this view
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

    def existing_or_new(self, name: str) -> optuna.Study:
        """The study ``name``, created if it does not exist yet."""
        study = self.study(name, create=True)
        assert study is not None
        return study

    def existing(self, name: str) -> optuna.Study:
        """The study ``name``, which the engine created before asking for it."""
        study = self.study(name)
        if study is None:
            raise WdstudyError(f"study {name!r} is missing from the storage (was it launched with this spec?)")
        return study

    def supersede(self, name: str) -> None:
        """Keep a phase study's runs as ``NAME/superseded-K`` and remove ``NAME``, so that the phase is
        redone: a grown search changed a race's candidates, or a grown race changed the pick.

        The copy holds every trial and attribute (no report reads it: it has no cell record and
        its name ends in neither ``/race`` nor ``/eval``); a crash between copy and removal leaves a
        second copy, never a lost run.
        """
        prefix = f"{name}/superseded-"
        k = 1 + sum(s.study_name.startswith(prefix) for s in self.storage.get_all_studies())
        optuna.copy_study(from_study_name=name, from_storage=self.storage, to_storage=self.storage,
                          to_study_name=f"{prefix}{k}")
        optuna.delete_study(study_name=name, storage=self.storage)
        self._studies.pop(name, None)

    def finished(self, cell: Cell) -> bool:
        """Whether this view found ``cell`` with nothing left to run."""
        return cell.name in self._done

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
        """The next unit of ``cell``'s first unfinished phase; ``(None, True)`` when it has none left."""
        self.existing(cell.name)
        for phase in self.phases:
            if phase is self.search and cell.name in self._searched:
                continue
            study = phase.open(self, cell)
            if study is None:
                return None, True  # nothing to race or evaluate: no search trial completed
            unit, idle = self._take_or_advance(cell, study, phase)
            if unit is not None or not idle:
                return unit, False
            if phase is self.search:
                self._searched.add(cell.name)
        state = self.rounds.next_round(self, cell)
        if state == "opened":
            unit, _ = self._take_or_advance(cell, self.existing(cell.eval_name), self.evaluation)
            return unit, False
        return None, state == "done"

    def _take_or_advance(self, cell: Cell, study: optuna.Study, phase: Phase) -> tuple[Unit | None, bool]:
        """A WAITING trial of ``study`` reserved, or (None, True) when it has nothing left to run."""
        trials = study.get_trials(deepcopy=False)
        if self._release_stale(study, [t for t in trials if t.state == TrialState.RUNNING]):
            trials = study.get_trials(deepcopy=False)
        if self.end_duplicates(study, phase, trials):
            trials = study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return self._take(cell, study, phase), False
        if any(t.state == TrialState.RUNNING for t in trials):
            return None, False
        if phase.advance(self, cell, study, trials):
            return self._take(cell, study, phase), False
        return None, True

    @staticmethod
    def _unowned(study: optuna.Study) -> tuple[optuna.Study, int] | None:
        """A RUNNING trial of ``study`` that no worker has tagged: under the study lock, only one that
        this worker's ``ask`` started and could not finish (None if there is none or it cannot be read)."""
        try:
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        except Exception:
            return None
        return next(((study, trial_id(t)) for t in running if R.OWNER not in t.system_attrs), None)

    def _take(self, cell: Cell, study: optuna.Study, phase: Phase) -> Unit:
        study.pruner = phase.pruner(cell)
        try:
            trial = study.ask(distributions(self.spec, cell))
        except Exception:
            # ask turns a WAITING trial RUNNING, then writes its parameters: cut off between the two
            # (a full disk, a lost connection), that trial is RUNNING with no owner, and failed as taken
            self.taken = self._unowned(study)
            raise
        self.taken = (study, trial_id(trial))  # RUNNING, not yet tagged: failed if the tagging is cut off
        storage_of(study).set_trial_system_attr(trial_id(trial), R.OWNER, owner_tag())
        storage_of(study).set_trial_system_attr(trial_id(trial), R.LEASE, time.time())
        self.taken = None
        return Unit(phase, cell, study, trial)
