"""The worker loop: reserve a unit, run it, record it — until every cell is searched and evaluated.

Any number of workers, on any number of machines, run :class:`Worker` on the same spec and
storage. Each turn of the loop has three steps, Optuna's ask-and-tell:

1. **reserve** (under the study lock, signals held): :meth:`Cells.reserve
   <wdstudy.cells.Cells.reserve>` asks for the next WAITING trial of any cell (opening a
   generation or queuing evaluation seeds as needed) and tags it with this worker as owner;
2. **run** (no lock; a :class:`~wdstudy.storage.Lease` renews ownership): one training
   run — a search trial or a race run (a candidate on a new seed) measured on the
   validation split, or an evaluation seed measured on the test split;
3. **record** (signals held): ``study.tell`` the value, or PRUNED for a pruned or diverged
   run. A run that raises ends FAIL with the exception's one-line reason and is re-queued
   under the lock; the worker goes on. SIGINT / SIGTERM fail and re-queue the running trial,
   then stop the worker. So does a device the worker was promised but cannot use
   (:class:`~wdstudy.train.DeviceUnavailable`): the trial fails with that reason and the
   worker takes no more work, instead of failing every trial of the study in seconds.

A storage that cannot be written (a full disk, a quota, a read-only or forbidden path: the
journal, the database or the run's own files) stops the worker
(:class:`~wdstudy.outage.StorageUnwritable`). Before it stops, it fails its running trial
with that reason and kind :data:`~wdstudy.records.STORAGE` (re-queued, counted as no
retry), under the study lock; on a full journal disk it does so in the room the journal's disk
reserve leaves once deleted (:mod:`wdstudy.journal`); no worker takes a new unit while that
reserve cannot be made whole. If even that cannot be written (several
workers stopped at once, more than the reserve holds), the trial stays RUNNING under a dead
owner and the next launch re-queues it.
"""

from __future__ import annotations

import math
import os
import time
import traceback
from collections.abc import Callable

import optuna
from optuna.trial import TrialState

from . import records as R
from .cells import Cells
from .errors import one_line
from .outage import StorageFault, StorageUnwritable, classify, full, retry_block, unwritable
from .phases import RunPlan, Unit
from .redact import scrub
from .signals import STOP, WorkerStopped, stopped
from .spec import Cell, StudySpec
from .storage import Lease, StudyLock, is_rdb, open_storage, owner_tag, trial_id

#: A training run as the worker calls it: ``train(cell, lr, weight_decay, seed, callbacks, with_test)``
#: returns an object with ``metrics`` (a dict holding the objective and, with ``with_test``,
#: ``test_error``), ``history`` and optionally ``test_outcomes``; it may raise
#: :class:`~wdstudy.train.DivergedError`.
TrainFn = Callable[..., object]


class Worker:
    """Runs units until every cell is searched and evaluated."""

    def __init__(self, spec: StudySpec, url: str, *, log: Callable[[str], None] | None = None, poll: float = 1.0,
                 train: TrainFn | None = None, storage: optuna.storages.BaseStorage | None = None,
                 lock=None, lease: Callable | None = None):
        """``train``, ``storage``, ``lock`` and ``lease`` replace the real training run, the storage
        opened from ``url``, the study lock and the trial lease: the simulator
        (:mod:`wdstudy.simulate`) runs the same engine in memory on a synthetic landscape."""
        self.spec = spec
        self.url = url
        self.storage = storage if storage is not None else open_storage(url)
        self.lock = lock if lock is not None else StudyLock(url, spec.name)
        self._lease = lease or Lease
        self.cells = Cells(spec, self.storage)
        out = log or (lambda msg: print(msg, flush=True))
        self.log = lambda msg: out(scrub(msg))  # a traceback may quote a connection string
        self.runner = UnitRunner(spec, train, self.log)
        self.poll = poll
        self.progress_file = os.environ.get("WDSTUDY_PROGRESS_FILE")
        self._journal = storage is None and not is_rdb(url)  # a journal file this worker opened

    def run(self, max_units: int | None = None) -> int:
        """Work until done (or ``max_units`` units); returns the number of units run."""
        ran = 0
        while max_units is None or ran < max_units:
            unit = None
            try:
                with STOP.held():
                    unit, finished = retry_block(self._reserve, self.url, log=self.log)
            except WorkerStopped as exc:  # stopped while reserving: the unit it got is failed and re-queued
                if unit is not None:  # no second signal can interrupt this: the first one ignored the rest
                    try:
                        self._fail(unit, f"worker {owner_tag()} {exc}", _kind(exc))
                    except StorageUnwritable as fault:  # the disk is full too: in the reserve's room
                        self._fail_unwritable(unit, fault)
                        raise
                raise
            except StorageUnwritable as fault:  # a trial it was taking as the disk filled is failed too
                self._fail_unwritable(None, fault)
                raise
            if unit is None:
                if finished:
                    return ran
                time.sleep(self.poll)  # other workers hold the rest of the current generations
                continue
            self.execute(unit)
            ran += 1
            if self.progress_file:
                with open(self.progress_file, "a") as f:
                    f.write(f"{unit.kind} {unit.study.study_name} {unit.trial.number}\n")
        return ran

    def _reserve(self) -> tuple[Unit | None, bool]:
        """One reservation under the study lock (run again from the start after a lost connection).
        On a journal, no new unit without the disk reserve whole: a disk too full to hold it stops
        the worker (the reserve's room is for the failure records of the units already running)."""
        with self.lock:
            if self._journal:
                from .journal import keep_reserve

                keep_reserve(self.url, strict=True)
            if self.cells.taken is not None:  # a trial this worker got as its connection dropped
                study, taken_id = self.cells.taken
                self.cells.fail(study, taken_id, f"worker {owner_tag()}: the storage connection was lost while "
                                "reserving it", R.LOST)
                self.cells.taken = None
            return self.cells.reserve()

    def _fail(self, unit: Unit, reason: str, kind: str) -> None:
        """Fail and re-queue the unit's trial under the study lock, through an outage."""
        def block():
            with self.lock:
                self.cells.fail(unit.study, trial_id(unit.trial), reason, kind)

        retry_block(block, self.url, log=self.log)

    def _fail_unwritable(self, unit: Unit | None, fault: StorageUnwritable) -> None:
        """Before the worker stops on a storage that cannot be written: :func:`fail_unwritable`."""
        fail_unwritable(self.cells, self.lock, self.url, self.log, unit, fault)

    def execute(self, unit: Unit) -> None:
        """Run a reserved unit and record its result (FAIL and re-queue if it raises); on a storage
        that cannot be written, fail it with the reason and stop (:class:`StorageUnwritable`)."""
        try:
            self._execute(unit)
        except StorageUnwritable as fault:
            self._fail_unwritable(unit, fault)
            raise

    def _execute(self, unit: Unit) -> None:
        trial = unit.trial
        try:
            with self._lease(self.storage, trial_id(trial)):
                value = self.runner.run(unit)
        except WorkerStopped as exc:
            with STOP.held():
                self._fail(unit, f"worker {owner_tag()} {exc}", _kind(exc))
            raise
        except StorageFault:  # the storage is full (its trial is failed by execute) or gone (re-queued by the next launch)
            raise
        except Exception as exc:
            if classify(exc) == "unwritable":  # a full disk under the run's own files: the same stop
                raise unwritable(exc, "the run's files") from None
            if _device_unavailable(exc):  # it will not get better: fail this trial loudly, then stop
                self.log(f"[{owner_tag()}] {unit.study.study_name} trial {trial.number} failed: {one_line(exc)}")
                with STOP.held():
                    self._fail(unit, scrub(one_line(exc)), R.ERROR)
                raise
            if _device_fault(exc):  # the CUDA context is poisoned: fail as lost, a fresh process goes on
                self.log(f"[{owner_tag()}] {unit.study.study_name} trial {trial.number} lost to a device "
                         f"error: {one_line(exc)}")
                with STOP.held():
                    self._fail(unit, scrub(one_line(exc)), R.LOST)
                from .train import DeviceFault

                raise DeviceFault(one_line(exc)) from exc
            # a bug in a model, CUDA out of memory, ...: fail this trial, go on
            self.log(f"[{owner_tag()}] {unit.study.study_name} trial {trial.number} failed:\n{traceback.format_exc()}")
            with STOP.held():
                self._fail(unit, scrub(one_line(exc)), R.ERROR)
            return
        with STOP.held():
            if value is None:
                frozen = unit.study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
            else:
                frozen = unit.study.tell(trial, value, skip_if_finished=True)
        if frozen.state == TrialState.FAIL:
            self.log(f"[{owner_tag()}] {unit.study.study_name} trial {trial.number} was taken over "
                     f"({R.RunRecord.of(frozen).fail_reason}); its result is discarded")


def fail_unwritable(cells: Cells, lock, url: str, log: Callable[[str], None], unit: Unit | None,
                    fault: StorageUnwritable) -> None:
    """Before a worker stops on a storage that cannot be written: fail ``unit`` (and a trial it
    was taking) with the reason, kind :data:`~wdstudy.records.STORAGE`, and re-queue it. On a
    full journal disk, the disk reserve beside the journal is deleted to make room for it. What
    still cannot be written stays RUNNING for the next launch to re-queue."""
    taken = cells.taken
    if unit is None and taken is None:
        return
    why = f"worker {owner_tag()} stopped: {fault.what or fault}"

    def fail_all() -> None:
        if taken is not None:
            cells.fail(taken[0], taken[1], why, R.STORAGE)
            cells.taken = None
        if unit is not None:
            cells.fail(unit.study, trial_id(unit.trial), why, R.STORAGE)

    def block() -> None:
        with lock:
            try:
                fail_all()
            except StorageUnwritable as again:  # the failed append was undone: no half record
                from .journal import release_reserve

                if not (full(again) and not is_rdb(url) and release_reserve(url)):
                    raise
                fail_all()

    try:
        with STOP.held():
            retry_block(block, url, log=log)
    except (StorageFault, WorkerStopped, OSError):  # no room even so (or a log on the full disk)
        pass


class UnitRunner:
    """One unit's training run, as its phase plans it (:class:`~wdstudy.phases.RunPlan`), and its
    result stored on the trial; the splits of built-in tasks are loaded once per worker."""

    def __init__(self, spec: StudySpec, train: TrainFn | None, log: Callable[[str], None]):
        self.spec = spec
        self.log = log
        self.train: TrainFn = train if train is not None else self.real_train
        self._data: dict[tuple, object] = {}

    def run(self, unit: Unit) -> float | None:
        """Train the unit as its phase plans it; the metric Optuna is told, or None if the run was
        pruned or diverged."""
        trial, cell = unit.trial, unit.cell
        trial.set_user_attr(R.WORKER, owner_tag())
        trial.set_user_attr(R.CUDA_VISIBLE_DEVICES, os.environ.get("CUDA_VISIBLE_DEVICES"))
        lr, wd = trial.params["lr"], R.decay_of(trial.params, cell.task.steps_per_epoch)
        plan = unit.phase.plan(unit)
        self.log(f"[{owner_tag()}] {plan.label}: lr={lr:.3g} λ={wd:.3g}")
        # the real run records its device as it starts; an injected one (a simulator) has none
        callbacks: list = [_device_recorder(trial)] if self.train == self.real_train else []
        if plan.prune:  # without a pruner, reporting every epoch is wasted storage writes
            callbacks.append(pruning_callback(trial, plan.key, self.log))
        try:
            value = self._measure(trial, cell, lr, wd, plan, callbacks)
        except optuna.TrialPruned:
            trial.set_user_attr(R.OUTCOME, "pruned")
            return None
        if plan.curve_as_steps:  # the learning curve as Optuna's intermediate values, for the dashboard
            for row in R.RunRecord.from_attrs(trial.user_attrs).history:
                v = row.get(plan.key)
                if v is not None and math.isfinite(v):
                    trial.report(v, int(row["epoch"]))
        return value

    def _measure(self, trial: optuna.Trial, cell: Cell, lr: float, wd: float, plan: RunPlan,
                 callbacks: list) -> float | None:
        """Train once, store the metrics on ``trial`` and return the plan's metric; None, with outcome
        ``diverged`` and the reason, if the loss or that metric became NaN or infinite. A pruning
        callback's ``optuna.TrialPruned`` passes through."""
        from .train import DivergedError

        try:
            result = self.train(cell, lr, wd, plan.seed, callbacks, with_test=plan.with_test)
        except DivergedError as exc:
            return self._diverged(trial, str(exc))
        self._store(trial, cell, result, history=plan.history)
        value = result.metrics[plan.key]
        if not math.isfinite(value):
            return self._diverged(trial, f"objective is {value}")
        trial.set_user_attr(R.OUTCOME, "complete")
        return value

    @staticmethod
    def _diverged(trial: optuna.Trial, reason: str) -> None:
        trial.set_user_attr(R.OUTCOME, "diverged")
        trial.set_user_attr(R.REASON, reason)

    def _store(self, trial: optuna.Trial, cell: Cell, result, history: bool = True) -> None:
        for k in R.METRIC_KEYS:
            if k in result.metrics:
                trial.set_user_attr(k, result.metrics[k])
        if history:
            trial.set_user_attr(R.HISTORY, result.history)
        if getattr(result, "mechanics", None):
            trial.set_user_attr(R.MECHANICS, result.mechanics)
        if getattr(result, "test_outcomes", None):
            from .tasks.names import task_metric

            trial.set_user_attr(R.TEST_OUTCOMES, R.encode_outcomes(result.test_outcomes,
                                                                   task_metric(cell.task.name).is_rate))

    def data(self, cell: Cell, with_test: bool):
        """The cell's splits, loaded once per worker and kept in memory (a factory task's come
        from its factory with each run: see :mod:`wdstudy.tasks.user`)."""
        if cell.task.is_user:
            return None
        key = (cell.task.dataset, cell.task.val_fraction, cell.task.split_seed, cell.task.max_train,
               cell.task.data_dir, with_test)
        if key not in self._data:
            self._data[key] = cell.task.load_data(with_test=with_test)
        return self._data[key]

    def real_train(self, cell: Cell, lr: float, wd: float, seed: int, callbacks, with_test: bool):
        """The real training run (:func:`~wdstudy.train.train_run`), the worker's default ``train``."""
        from .train import train_run

        data = self.data(cell, with_test)
        rng = self.spec.weight_decay_range(cell.regularizer)
        if rng is not None and rng.axis == "timescale_epochs" and data is not None:
            from .preflight import check_train_size

            check_train_size(cell.task, len(data.train), f"tasks[{cell.task.name}].data_dir={cell.task.data_dir!r}")
        return train_run(
            cell.task, cell.optimizer, cell.regularizer, lr, wd,
            seed=seed, schedule=self.spec.schedule, decay_all=self.spec.decay_all,
            with_test=with_test, callbacks=[*callbacks, _stop_check()], data=data,
            accelerator=os.environ.get("WDSTUDY_ACCELERATOR", "auto"),
        )


def pruning_callback(trial: optuna.Trial, monitor: str, log: Callable[[str], None]):
    """Optuna's Lightning pruning callback, which reports each epoch and asks the pruner — except
    that while the storage is unreachable the epoch's report is skipped (one log line) and training
    goes on, instead of pausing the run until the database is back: the unit being trained keeps
    training through an outage, and its result is recorded when the storage answers again."""
    from optuna_integration import PyTorchLightningPruningCallback

    from .outage import StorageDisconnected, no_retry

    class OutageTolerantPruning(PyTorchLightningPruningCallback):
        skipped = 0

        def on_validation_end(self, trainer, pl_module) -> None:
            try:
                with no_retry():
                    super().on_validation_end(trainer, pl_module)
            except StorageDisconnected as exc:
                if not self.skipped:
                    log(f"[{owner_tag()}] trial {trial.number}: the storage is unreachable ({exc}); "
                        "training goes on without pruning until it is back")
                self.skipped += 1

    return OutageTolerantPruning(trial, monitor=monitor)


def _device_recorder(trial: optuna.Trial):
    """A callback that records on ``trial`` the device its run trains on, as training starts, so
    that runs ending early (pruned, diverged, failed) still tell where their time went."""
    from lightning.pytorch import Callback

    from .train import device_label

    class DeviceRecorder(Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            trial.set_user_attr(R.DEVICE, device_label(pl_module.device))

    return DeviceRecorder()


def _stop_check():
    """A callback that stops the run after a batch once a stop signal is pending, should its
    exception have been dropped where it was raised (a garbage collector's weakref callback)."""
    from lightning.pytorch import Callback

    class StopCheck(Callback):
        def on_train_batch_end(self, *args) -> None:
            if STOP.pending is not None and not STOP.depth:
                raise stopped(STOP.pending)

    return StopCheck()


def _kind(stop: WorkerStopped) -> str:
    """A stopped worker's trial is lost, unless its launch stopped it for a storage that cannot be written."""
    return R.STORAGE if stop.by_storage else R.LOST


def _device_fault(exc: BaseException) -> bool:
    from .train import is_device_fault

    return is_device_fault(exc)


def _device_unavailable(exc: BaseException) -> bool:
    from .train import DeviceUnavailable

    return isinstance(exc, DeviceUnavailable)
