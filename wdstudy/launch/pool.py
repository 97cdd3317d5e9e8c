"""The worker pool of a launch: start the workers, reap the ones that exit, restart the ones that died.

Each worker is ``python -m wdstudy worker SPEC --single`` in a slot of its own (its environment from
:func:`~wdstudy.launch.plan.plan_slots`), logging to ``OUTPUT/logs/worker-N.log``. A worker that
dies is replaced and its trial re-queued; only a slot that *crash-loops* (:data:`CRASH_LOOP`
failures in a row without finishing a unit: the worker exits with an error or crashes, as opposed
to being killed from outside) is given up, and a slot whose device is unusable
(:data:`DEVICE_UNUSABLE`) at once; a worker whose device failed mid-run (:data:`DEVICE_FAULT`)
is replaced like any death. A worker that stops because its storage is gone
(:data:`~wdstudy.outage.STORAGE_FAULT`) or cannot be written
(:data:`~wdstudy.outage.STORAGE_UNWRITABLE`) stops the pool. :func:`run_pool` watches the pool
until every unit is recorded and shows the progress (:mod:`.progress`) meanwhile.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import WdstudyError
from ..outage import STORAGE_FAULT, STORAGE_UNWRITABLE, StorageFault, retry_block
from ..spec import StudySpec
from ..storage import StudyLock
from .progress import PlainProgress, Progress, ProgressRenderer, RichProgress

if TYPE_CHECKING:
    from ..cells import Cells

#: A slot is given up after this many crashes in a row without finishing a unit (kills from outside do not count).
CRASH_LOOP = 8
#: Exit code of a worker whose device is unusable (a GPU slot without a usable GPU): never restarted.
DEVICE_UNUSABLE = 3
#: Exit code of a worker whose device failed during a run (a device-side error poisons the process's
#: CUDA context): its trial is already failed as lost; a fresh process takes the slot.
DEVICE_FAULT = 6
#: Exit codes of a worker killed from outside (an OOM killer, a person, a preemption): never a crash loop.
KILLED = (-signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT, -signal.SIGHUP)


@dataclass
class Slot:
    """One worker's place in the pool: its environment, its current process and its record of deaths."""

    index: int
    env: dict[str, str]
    proc: subprocess.Popen | None = None
    deaths: int = 0  # in a row, without finishing a unit
    restart_at: float = 0.0
    finished: bool = False
    log: Path | None = None
    progress: Path | None = None  # the worker appends a line to it per unit finished
    progress_at_start: int = 0

    def progress_bytes(self) -> int:
        """The size of the worker's progress file in bytes: it grows with every unit the slot finishes."""
        try:
            return self.progress.stat().st_size if self.progress else 0
        except FileNotFoundError:
            return 0


class Pool:
    """The worker processes of one launch over one study, one per slot."""

    def __init__(self, spec_path: str, spec: StudySpec, url: str, slots: list[dict[str, str]], log_dir: Path):
        self.spec_path, self.spec, self.url, self.log_dir = spec_path, spec, url, log_dir
        self.slots = [Slot(i, env) for i, env in enumerate(slots)]
        self.fault: str | None = None  # why the storage stopped the pool (a full disk, a long outage)
        self.unwritable = False  # whether it stopped because the storage cannot be written (a full disk)

    def start(self) -> None:
        for s in self.slots:
            self._start(s)

    def _start(self, slot: Slot) -> None:
        slot.log = self.log_dir / f"worker-{slot.index}.log"
        slot.progress = self.log_dir / f"worker-{slot.index}.units"
        slot.progress_at_start = slot.progress_bytes()
        env = {**os.environ, **slot.env, "PYTHONUNBUFFERED": "1", "WDSTUDY_PARENT_PID": str(os.getpid()),
               "WDSTUDY_PROGRESS_FILE": str(slot.progress), "WDSTUDY_STORAGE": self.url}
        # the URL goes through the environment: a command line is visible to every user of the machine
        cmd = [sys.executable, "-m", "wdstudy", "worker", self.spec_path, "--single"]
        with open(slot.log, "a") as f:
            slot.proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def all_finished(self) -> bool:
        return all(s.finished for s in self.slots)

    def any_progress(self) -> bool:
        """Whether any worker has finished a unit (it is then past its start-up)."""
        return any(s.progress_bytes() for s in self.slots)

    def reap(self, cells: Cells) -> None:
        """Look at every worker that exited: a clean exit finishes its slot, a storage fault stops the
        pool, a death re-queues its trial and schedules a restart (or gives the slot up)."""
        for s in self.slots:
            if s.finished or s.proc is None:
                continue
            rc = s.proc.poll()
            if rc is None:
                continue
            if rc == 0:
                s.finished = True
            elif rc in (STORAGE_FAULT, STORAGE_UNWRITABLE):  # its storage is full or gone: stop the pool
                s.finished = True
                self.unwritable = self.unwritable or rc == STORAGE_UNWRITABLE
                self.fault = _last_error(s.log)
                if self.fault.startswith("see "):  # its log could not be written either
                    self.fault = f"worker {s.index} stopped: its storage or its log cannot be written ({self.fault})"
            else:  # a worker died (killed, crashed): fail and re-queue its trial, start a replacement
                _release(self.url, self.spec, cells, {s.proc.pid})
                self._died(s, rc)

    def _died(self, s: Slot, rc: int) -> None:
        if rc == DEVICE_UNUSABLE:  # it will not get better by restarting
            s.finished = True
            print(f"wdstudy: worker {s.index} cannot use its device "
                  f"(CUDA_VISIBLE_DEVICES={s.env.get('CUDA_VISIBLE_DEVICES') or '(none)'}): "
                  f"{_last_error(s.log)}; giving it up", file=sys.stderr)
            return
        # Killed from outside is not a crash loop, however often it happens; exiting on its own with an
        # error, or another signal (a segfault), counts unless the worker finished a unit since.
        s.deaths = 0 if rc in KILLED or s.progress_bytes() > s.progress_at_start else s.deaths + 1
        if s.deaths >= CRASH_LOOP:
            s.finished = True
            print(f"wdstudy: worker {s.index} crashed {s.deaths} times in a row without finishing a unit; "
                  f"giving it up (see {s.log})", file=sys.stderr)
            return
        s.proc = None
        s.restart_at = time.monotonic() + (min(10.0, 0.25 * 2 ** (s.deaths - 1)) if s.deaths > 1 else 0.0)

    def restart(self) -> None:
        """Start a replacement in every slot whose worker died, once its back-off is over."""
        for s in self.slots:
            if not s.finished and s.proc is None and time.monotonic() >= s.restart_at:
                self._start(s)

    def stop(self, cells: Cells, timeout: float = 60.0) -> None:
        """SIGTERM every worker (each fails and re-queues its trial), then SIGKILL stragglers. When a
        storage that cannot be written stopped the pool, the signal is
        :data:`~wdstudy.signals.STORAGE_STOP` instead: the trials are failed as the full disk's
        (``fail_kind: storage``, no retry counted), also those of workers that did not get to fail them.

        If the storage cannot take the re-queuing now (full, unreachable), the trials stay
        RUNNING under dead owners: the next launch re-queues them before it starts."""
        from .. import records as R
        from ..signals import STORAGE_STOP

        by_storage = self.fault is not None and self.unwritable
        self.terminate(timeout, STORAGE_STOP if by_storage else signal.SIGTERM)
        try:
            with StudyLock(self.url, self.spec.name):
                dead = {s.proc.pid for s in self.slots if s.proc is not None}
                if by_storage:
                    cells.release_dead(dead_pids=dead, why=f"stopped by its launch: {self.fault}", kind=R.STORAGE)
                else:
                    cells.release_dead(dead_pids=dead)
        except StorageFault:
            pass
        except Exception as exc:
            from ..outage import classify

            if classify(exc) is None:
                raise

    def terminate(self, timeout: float = 60.0, signum: int = signal.SIGTERM) -> None:
        """SIGTERM (or ``signum``) every running worker's process group; SIGKILL what is left after
        ``timeout`` seconds."""
        for s in self.slots:
            if s.proc is not None and s.proc.poll() is None:
                try:
                    os.killpg(s.proc.pid, signum)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + timeout
        for s in self.slots:
            if s.proc is None:
                continue
            try:
                s.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()


def _last_error(log: Path | None) -> str:
    """The reason a worker gave for exiting: the last ``wdstudy:`` line of its log."""
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith("wdstudy: ")]
    except (OSError, AttributeError):
        lines = []
    return lines[-1][len("wdstudy: "):] if lines else f"see {log}"


def _release(url: str, spec: StudySpec, cells: Cells, dead_pids: set[int]) -> None:
    """Fail and re-queue the trials of dead workers, under the study lock, through an outage."""
    def block():
        with StudyLock(url, spec.name):
            cells.release_dead(dead_pids=dead_pids)

    retry_block(block, url)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[None]:
    """SIGTERM (kill, timeout, a batch system) stops the pool as Ctrl-C does; SIGINT too, even when
    this process was started with it ignored (a background job of a non-interactive shell)."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    previous_int = signal.signal(signal.SIGINT, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, previous_int)


def run_pool(
    spec_path: str,
    spec: StudySpec,
    url: str,
    slots: list[dict[str, str]],
    *,
    quiet: bool = False,
    display: bool = True,
    warm: Callable[[], None] | None = None,
    setup: Callable[[], None] | None = None,
) -> bool:
    """Run worker processes until all finish; returns True if every cell is searched and evaluated.

    ``setup`` (creating the cells) runs once the workers are started, while they import
    torch. ``warm`` runs in a background thread once a worker has finished its first unit
    (the workers are then past their own start-up): the launcher's idle time pays for the
    imports of what it does at the end.
    """
    pool = Pool(spec_path, spec, url, slots, _log_dir(spec))
    pool.start()
    try:  # each worker creates or checks the cells too (under the study lock) before it takes work
        if setup is not None:
            setup()
    except BaseException:
        pool.terminate()
        raise
    from ..analysis import progress_frame
    from ..cells import Cells
    from ..storage import open_storage

    storage = open_storage(url)
    cells = Cells(spec, storage)

    def read() -> Progress:
        return Progress.from_frame(progress_frame(storage, spec.name))

    renderer = None if quiet or not display else RichProgress() if sys.stdout.isatty() else PlainProgress()
    interrupted = complete = False
    warming: threading.Thread | None = None
    with _signals_interrupt():
        try:
            complete, warming = _watch(pool, cells, read, renderer, warm)
        except KeyboardInterrupt:
            interrupted = True
        finally:  # also on any error in this process: never leave workers behind
            if renderer is not None:
                renderer.stop()
            if interrupted or not (complete or pool.all_finished):
                pool.stop(cells)
    if interrupted:
        raise KeyboardInterrupt
    if pool.fault is not None:
        raise StorageFault(f"{pool.fault} (the workers were stopped; no trial is lost)")
    if warming is not None:
        # the report forks its drawing processes: no thread may hold a lock (an import's, a font
        # cache's) at that moment, or a child inherits it locked and waits forever
        warming.join()
    return read().remaining == 0


def _log_dir(spec: StudySpec) -> Path:
    log_dir = spec.output_dir() / "logs"
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WdstudyError(f"output={str(spec.output_dir())!r}: cannot create {log_dir} "
                           f"({exc.strerror or exc})") from None
    return log_dir


def _watch(pool: Pool, cells: Cells, read: Callable[[], Progress], renderer: ProgressRenderer | None,
           warm: Callable[[], None] | None) -> tuple[bool, threading.Thread | None]:
    """Reap and restart workers and show the progress until every unit is recorded, every slot is
    finished or the storage stopped the pool. Returns whether every unit is recorded, and the
    thread running ``warm`` (if it was started)."""
    start = time.monotonic()
    first = read()
    remaining_at_start = first.remaining
    if renderer is not None:
        renderer.start(first.timed(0.0, remaining_at_start))
    last_shown = 0.0
    warming: threading.Thread | None = None
    while True:
        pool.reap(cells)
        pool.restart()
        if warm is not None and pool.any_progress():
            warming = threading.Thread(target=warm, name="warm", daemon=True)
            warming.start()
            warm = None
        if pool.fault is not None:
            return False, warming
        progress = read()
        # every unit recorded: go on while the workers exit by themselves (a second, with torch)
        complete = progress.remaining == 0
        done = complete or pool.all_finished
        now = time.monotonic()
        if renderer is not None and (done or now - last_shown >= renderer.interval):
            renderer.show(progress.timed(now - start, remaining_at_start), final=done)
            last_shown = now
        if done:
            return complete, warming
        # near the end, look more often: the wind-down starts as soon as the last unit is recorded
        time.sleep(0.2 if progress.remaining <= len(pool.slots) else 0.5)
