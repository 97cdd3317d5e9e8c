"""The search and evaluation workers: pull units of work from the shared storage and run them.

A unit is either one search trial of a cell (Optuna proposes ``lr`` and ``weight_decay``,
a training run measures the validation objective) or one evaluation run (the cell's best
configuration retrained with one evaluation seed and measured on the test split). Any
number of workers, on any number of machines, run :func:`run_worker` on the same spec and
storage; each takes whichever unit is free, so no worker idles while work remains.

Exact budgets: "count the cell's trials, then create one" happens under a
:class:`~wdstudy.storage.StudyLock`. A cell's search counts COMPLETE, PRUNED, RUNNING
and WAITING (retries) trials against its budget; FAILED ones (a killed worker) do not
count, and their parameters come back as WAITING retries.
"""

from __future__ import annotations

import importlib.metadata
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import TrialState

from .spec import Cell, StudySpec
from .storage import (
    MAX_RETRY,
    StudyLock,
    fail_and_retry,
    is_rdb,
    open_storage,
    owner_tag,
    release_dead_trials,
    retry_callback,
)
from .tasks import TaskData
from .train import DivergedError, train_run

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
RESERVED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
METRIC_KEYS = (
    "train_loss", "train_error", "val_loss", "val_error", "test_loss", "test_error",
    "val_gap_loss", "val_gap_error", "gap_loss", "gap_error", "weight_norm", "l2_penalty",
    "epochs", "steps", "wall_time_s", "device", "seed",
)
PACKAGES = ("wdstudy", "torch", "torchvision", "lightning", "optuna", "optuna-integration", "pandas", "numpy")

optuna.logging.set_verbosity(optuna.logging.WARNING)


class WorkerStopped(Exception):
    """Raised in a worker by SIGINT / SIGTERM, so the running trial ends FAILED (and is retried).

    An ``Exception`` rather than ``KeyboardInterrupt``: Lightning turns a
    KeyboardInterrupt into ``sys.exit``, which would leave the trial RUNNING.
    """


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def cell_record(spec: StudySpec, cell: Cell) -> dict[str, Any]:
    """What defines a cell; stored with its study, and checked again on resume."""
    wd = spec.weight_decay_range(cell.regularizer)
    return {
        "study": spec.name,
        "task": cell.task.model_dump(),
        "optimizer": cell.optimizer.model_dump(mode="json"),
        "regularizer": cell.regularizer,
        "schedule": spec.schedule,
        "decay_all": spec.decay_all,
        "lr_range": [spec.search.lr.low, spec.search.lr.high],
        "weight_decay_range": [wd.low, wd.high] if wd else None,
        "sampler": spec.search.sampler,
        "budget": spec.budget(cell.regularizer),
        "pruner": spec.search.pruner,
        "seed": spec.search.seed,
        "objective": spec.search.objective,
        "eval_seeds": list(range(spec.evaluation.first_seed, spec.evaluation.first_seed + spec.evaluation.seeds)),
    }


def _pruner(spec: StudySpec, cell: Cell) -> optuna.pruners.BasePruner:
    if spec.search.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=max(1, cell.task.epochs // 5))
    if spec.search.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cell.task.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def _sampler(spec: StudySpec, cell: Cell, n: int) -> optuna.samplers.BaseSampler:
    """A sampler seeded by (search seed, trial number): reproducible, distinct per trial,
    and the same sequence in every cell (fair), whichever worker asks."""
    seed = (spec.search.seed * 100_003 + n) % 2**32
    s = spec.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.sampler == "grid":
        space = {"lr": spec.search.lr.grid(s.grid_points)}
        wd = spec.weight_decay_range(cell.regularizer)
        if wd is not None:
            space["weight_decay"] = wd.grid(s.grid_points)
        # the grid's order is shuffled by the seed: it must be the same for every trial
        return optuna.samplers.GridSampler(space, seed=spec.search.seed)
    startup = s.startup_trials or min(10, max(1, s.trials // 3))
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True, multivariate=True)


def _metric_names(study: optuna.Study, name: str) -> None:
    """Name the objective, so the dashboard labels its axes with it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names([name])


def ensure_studies(spec: StudySpec, storage, spec_yaml: str | None = None) -> None:
    """Create every cell's study (idempotent) and record what it is; refuse a changed spec."""
    from .errors import WdstudyError

    versions = package_versions()
    for cell in spec.cells():
        study = optuna.create_study(
            study_name=cell.name, storage=storage, direction="minimize", load_if_exists=True
        )
        record = cell_record(spec, cell)
        stored = study.user_attrs.get("cell")
        if stored is None:
            _metric_names(study, spec.search.objective)
            study.set_user_attr("cell", record)
            study.set_user_attr("versions", versions)
            if spec_yaml is not None:
                study.set_user_attr("spec_yaml", spec_yaml)
        elif stored != record:
            changed = sorted(k for k in set(stored) | set(record) if stored.get(k) != record.get(k))
            raise WdstudyError(
                f"study {cell.name!r}: the spec changed since this study started "
                f"({', '.join(changed)} differ); use a new study name or output folder"
            )


@dataclass
class Unit:
    kind: str  # "search" or "eval"
    cell: Cell
    study: optuna.Study


def _counts(trials) -> Counter[TrialState]:
    return Counter(t.state for t in trials)


def _eval_study(spec: StudySpec, cell: Cell, storage, search: optuna.Study) -> optuna.Study | None:
    """The cell's evaluation study, created (with its best parameters) when first needed.

    Its runs, one per evaluation seed, are queued by :func:`_enqueue_missing_seeds`.
    """
    names = {s.study_name for s in storage.get_all_studies()}
    if cell.eval_name in names:
        return optuna.load_study(study_name=cell.eval_name, storage=storage)
    complete = search.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None  # nothing to evaluate: every trial pruned or failed
    best = min(complete, key=lambda t: t.value)
    ev = optuna.create_study(study_name=cell.eval_name, storage=storage, direction="minimize", load_if_exists=True)
    _metric_names(ev, "test_error")
    ev.set_user_attr("best_trial", best.number)
    ev.set_user_attr("best_value", best.value)
    ev.set_user_attr("best_params", best.params)  # pick_unit queues one run per seed from these
    return ev


def _enqueue_missing_seeds(spec: StudySpec, cell: Cell, ev: optuna.Study) -> None:
    """Queue every evaluation seed that has no live or finished run (an interrupted enqueue,
    or a run that failed more often than the retry limit)."""
    trials = ev.get_trials(deepcopy=False)
    alive = {t.user_attrs.get("seed") for t in trials if t.state != TrialState.FAIL}
    failures = Counter(t.user_attrs.get("seed") for t in trials if t.state == TrialState.FAIL)
    params = ev.user_attrs.get("best_params")
    if params is None:
        return
    for seed in cell_record(spec, cell)["eval_seeds"]:
        if seed not in alive and failures[seed] <= 2 * MAX_RETRY:  # give up on a seed that keeps crashing
            ev.enqueue_trial(params, user_attrs={"seed": seed})


def pick_unit(spec: StudySpec, storage) -> tuple[Unit | None, bool]:
    """Choose the next free unit; returns (unit, all_finished). Call under the StudyLock."""
    best_search: tuple[int, int, Unit] | None = None
    finished = True
    for i, cell in enumerate(spec.cells()):
        study = optuna.load_study(study_name=cell.name, storage=storage)
        c = _counts(study.get_trials(deepcopy=False))
        budget = spec.budget(cell.regularizer)
        reserved = sum(c.get(s, 0) for s in RESERVED)
        done = sum(c.get(s, 0) for s in DONE)
        # a WAITING trial (a re-queued failure) is runnable even when every slot is reserved
        if reserved < budget or c.get(TrialState.WAITING, 0):
            finished = False
            if best_search is None or reserved < best_search[0]:
                best_search = (reserved, i, Unit("search", cell, study))
            continue
        if done < budget:
            finished = False  # trials still running elsewhere
            continue
        ev = _eval_study(spec, cell, storage, study)
        if ev is None:
            continue
        _enqueue_missing_seeds(spec, cell, ev)
        ec = _counts(ev.get_trials(deepcopy=False))
        if ec.get(TrialState.WAITING, 0):
            return Unit("eval", cell, ev), False
        if ec.get(TrialState.RUNNING, 0):
            finished = False
    return (best_search[2] if best_search else None), finished


class Worker:
    """Runs units until every cell is searched and evaluated."""

    def __init__(self, spec: StudySpec, url: str, *, log: Callable[[str], None] | None = None, poll: float = 2.0):
        self.spec = spec
        self.url = url
        self.storage = open_storage(url)
        self.lock = StudyLock(url, spec.name)
        self.log = log or (lambda msg: print(msg, flush=True))
        self.poll = poll
        self._data: dict[tuple, TaskData] = {}
        self._current: tuple[optuna.Study, int] | None = None

    def data(self, cell: Cell, with_test: bool) -> TaskData:
        key = (cell.task.dataset, cell.task.val_fraction, cell.task.split_seed, cell.task.max_train,
               cell.task.data_dir, with_test)
        if key not in self._data:
            self._data[key] = cell.task.load_data(with_test=with_test)
        return self._data[key]

    def run(self, max_units: int | None = None) -> int:
        """Work until done (or ``max_units`` units); returns the number of units run."""
        names = self.spec.study_names()
        ran = 0
        while max_units is None or ran < max_units:
            STOP.defer()  # no interruption between "create a trial" and "the trial is owned"
            self.lock.acquire()
            try:
                release_dead_trials(self.storage, names)
                if is_rdb(self.url):
                    self._fail_stale(names)
                unit, finished = pick_unit(self.spec, self.storage)
                if unit is None:
                    self.lock.release()
                    if finished:
                        return ran
                    STOP.allow()
                    time.sleep(self.poll)
                    continue
                self._run_unit(unit)  # releases the lock once its trial exists
                self._current = None
            except WorkerStopped:
                self._retry_current("worker stopped by a signal")
                raise
            finally:
                self.lock.release()
            ran += 1
            STOP.allow()
        return ran

    def _fail_stale(self, names: list[str]) -> None:
        """Fail (and so retry) trials whose heartbeat stopped, whichever machine ran them.

        Optuna does this when a trial starts; an idle worker waiting for the last running
        trials must do it too, or a dead machine's trial would keep it waiting forever.
        """
        import warnings

        existing = {s.study_name for s in self.storage.get_all_studies()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            for name in names:
                if name in existing:
                    optuna.storages.fail_stale_trials(optuna.load_study(study_name=name, storage=self.storage))

    def _retry_current(self, reason: str) -> None:
        """Enqueue the parameters of the trial that an interruption ended FAILED."""
        if self._current is None:
            return
        study, trial_id = self._current
        frozen = study._storage.get_trial(trial_id)
        if frozen.state == TrialState.FAIL:  # the objective recorded the reason before it ended
            retry_callback()(study, frozen)
        elif frozen.state == TrialState.RUNNING:
            fail_and_retry(study, trial_id, frozen.number, reason)

    def _run_unit(self, unit: Unit) -> None:
        self._current = None
        n = len(unit.study.get_trials(deepcopy=False))
        if unit.kind == "search":
            unit.study.sampler = _sampler(self.spec, unit.cell, n)
            unit.study.pruner = _pruner(self.spec, unit.cell)
            objective = self._search_objective(unit.cell)
        else:
            objective = self._eval_objective(unit.cell)

        def guarded(trial: optuna.Trial) -> float:
            try:
                value = objective(trial)
                STOP.defer()  # let Optuna record the result before stopping
                return value
            except WorkerStopped as exc:
                trial.set_user_attr("reason", f"worker {exc}")
                raise

        unit.study.optimize(guarded, n_trials=1, catch=(), gc_after_trial=False)

    # -- objectives -------------------------------------------------------------------------

    def _begin(self, trial: optuna.Trial, cell: Cell) -> tuple[float, float]:
        """First lines of every objective: tag the trial, release the lock, read its params."""
        self._current = (trial.study, trial._trial_id)
        # owned before the lock is released, so a dead worker's trial is always recognisable
        trial.study._storage.set_trial_system_attr(trial._trial_id, "owner", owner_tag())
        self.lock.release()
        STOP.allow()  # from here an interruption fails the trial, which is then queued again
        trial.set_user_attr("worker", owner_tag())
        if trial.user_attrs.get("reason") is not None:  # a retry inherits the failed trial's attributes
            trial.set_user_attr("reason", None)
        trial.set_user_attr("cuda_visible_devices", os.environ.get("CUDA_VISIBLE_DEVICES"))
        lr = self.spec.search.lr
        lr_v = trial.suggest_float("lr", lr.low, lr.high, log=True)
        wd = self.spec.weight_decay_range(cell.regularizer)
        wd_v = trial.suggest_float("weight_decay", wd.low, wd.high, log=True) if wd else 0.0
        return lr_v, wd_v

    def _store(self, trial: optuna.Trial, result) -> None:
        for k in METRIC_KEYS:
            if k in result.metrics:
                trial.set_user_attr(k, result.metrics[k])
        trial.set_user_attr("history", result.history)

    def _search_objective(self, cell: Cell):
        def objective(trial: optuna.Trial) -> float:
            lr, wd = self._begin(trial, cell)
            self.log(f"[{owner_tag()}] {cell.name} trial {trial.number}: lr={lr:.3g} λ={wd:.3g}")
            from optuna_integration import PyTorchLightningPruningCallback

            pruning = PyTorchLightningPruningCallback(trial, monitor=self.spec.search.objective)
            try:
                result = self._train(cell, lr, wd, self.spec.search.seed, [pruning], with_test=False)
            except DivergedError as exc:
                trial.set_user_attr("outcome", "diverged")
                trial.set_user_attr("reason", str(exc))
                raise optuna.TrialPruned(f"diverged: {exc}") from None
            except optuna.TrialPruned:
                trial.set_user_attr("outcome", "pruned")
                raise
            self._store(trial, result)
            trial.set_user_attr("outcome", "complete")
            value = result.metrics[self.spec.search.objective]
            if not math.isfinite(value):
                trial.set_user_attr("outcome", "diverged")
                raise optuna.TrialPruned(f"diverged: objective is {value}")
            return value

        return objective

    def _eval_objective(self, cell: Cell):
        def objective(trial: optuna.Trial) -> float:
            lr, wd = self._begin(trial, cell)
            seed = int(trial.user_attrs["seed"])
            self.log(f"[{owner_tag()}] {cell.eval_name} seed {seed}: lr={lr:.3g} λ={wd:.3g}")
            try:
                result = self._train(cell, lr, wd, seed, [], with_test=True)
            except DivergedError as exc:
                trial.set_user_attr("outcome", "diverged")
                trial.set_user_attr("reason", str(exc))
                raise optuna.TrialPruned(f"diverged: {exc}") from None
            self._store(trial, result)
            trial.set_user_attr("outcome", "complete")
            return result.metrics["test_error"]

        return objective

    def _train(self, cell: Cell, lr: float, wd: float, seed: int, callbacks, with_test: bool):
        return train_run(
            cell.task, cell.optimizer, cell.regularizer, lr, wd,
            seed=seed, schedule=self.spec.schedule, decay_all=self.spec.decay_all,
            with_test=with_test, callbacks=callbacks, data=self.data(cell, with_test),
            accelerator=os.environ.get("WDSTUDY_ACCELERATOR", "auto"),
        )


class _StopSignal:
    """SIGINT / SIGTERM handling of a worker: raise WorkerStopped, or hold it while deferred.

    Deferred while the worker holds the study lock and creates a trial, and while Optuna
    records a finished trial: an interruption there would leave a RUNNING trial that no
    one owns. The held signal is raised at the next :meth:`allow`.
    """

    def __init__(self) -> None:
        self.deferred = False
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if self.deferred:
            self.pending = signum
            return
        raise WorkerStopped(f"stopped by signal {signum}")

    def defer(self) -> None:
        self.deferred = True

    def allow(self) -> None:
        self.deferred = False
        if self.pending is not None:
            raise WorkerStopped(f"stopped by signal {self.pending}")


STOP = _StopSignal()


def install_stop_handlers() -> None:
    """SIGINT / SIGTERM raise WorkerStopped (once), so the running trial ends FAILED and is retried."""
    handler = STOP.handler

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    parent = os.environ.get("WDSTUDY_PARENT_PID")
    if parent and sys.platform.startswith("linux"):
        # started by a launcher: if it dies, stop too (SIGTERM), rather than train on unsupervised
        import ctypes

        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except OSError:
            pass
        if str(os.getppid()) != parent:  # it died before we got here
            os.kill(os.getpid(), signal.SIGTERM)
