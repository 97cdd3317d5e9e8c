"""A storage that goes away for a while is a pause; a storage that cannot be written is a clean stop.

Every storage wdstudy opens is wrapped in :class:`RetryingStorage`. Each call classifies what
it raises (:func:`classify`):

* **transient** — a lost or refused database connection (SQLAlchemy's ``OperationalError``,
  ``InterfaceError``, ``DisconnectionError``; psycopg's connection errors; Optuna's
  ``StorageInternalError`` caused by one), or a network file system's ``EIO`` / ``ESTALE``
  under a journal: the call is retried with exponential backoff and jitter, one log line when
  the outage starts and one when it ends, for up to the outage window
  (``WDSTUDY_STORAGE_OUTAGE`` seconds, default 600). Past the window it raises
  :class:`StorageOutage`: one line naming the storage (password hidden) and the outage length.
* **unwritable** — ``ENOSPC``, ``EDQUOT``, ``EROFS``, ``EACCES``: raises
  :class:`StorageUnwritable` at once, one line naming the path and the reason.

Retried writes are safe to repeat: attribute writes and intermediate values overwrite; a
state change (``tell``, failing a trial) that reached the database before its connection
dropped is recognised on the retry (the trial already holds that state and those values) and
reported as done, so no trial is told twice or failed by its own retry.

Blocks that change the study under the :class:`~wdstudy.storage.StudyLock` (reserving,
failing and re-queuing, creating the cells) are not retried call by call: the database also
holds the lock's session, and a lock lost in an outage protects nothing. Inside
:func:`retry_block` a transient error aborts the block (:class:`StorageDisconnected`); the
lock is released, the storage waited for, and the whole block run again from what the
storage holds — which :mod:`wdstudy.cells` is built to repair, as after a crash.

A trial's creation (queuing a unit) is the one write neither can make safe by itself: when its
COMMIT reached the database and the answer was lost, Optuna's RDB storage creates the trial again
on its own, below this wrapper. The engine takes care of it: a reservation ends every second copy
of a queued unit FAIL, unrun (``fail_kind`` ``duplicate``), so each unit still runs once.
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .errors import WdstudyError
from .redact import redact, scrub

UNWRITABLE = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES)
TRANSIENT_OS = (errno.EIO, errno.ESTALE, errno.ECONNRESET, errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EPIPE)
#: Exit code of a worker stopped by its storage (an outage past the window): never a crash.
STORAGE_FAULT = 4
#: Exit code of a worker stopped by a storage that cannot be written (a full disk, a quota, a
#: read-only or forbidden path): never a crash; its launch stops the other workers with
#: :data:`~wdstudy.signals.STORAGE_STOP` so that their trials are failed as the full disk's.
STORAGE_UNWRITABLE = 5


def exit_code(fault: BaseException) -> int:
    """The exit code of a worker stopped by ``fault``: :data:`STORAGE_UNWRITABLE` or :data:`STORAGE_FAULT`."""
    return STORAGE_UNWRITABLE if isinstance(fault, StorageUnwritable) else STORAGE_FAULT


def outage_window() -> float:
    """Seconds a storage may stay unreachable before the workers stop (``WDSTUDY_STORAGE_OUTAGE``)."""
    raw = os.environ.get("WDSTUDY_STORAGE_OUTAGE", "600")
    try:
        value = float(raw)
    except ValueError:
        raise WdstudyError(f"WDSTUDY_STORAGE_OUTAGE={raw!r}: must be a number of seconds") from None
    if not value >= 0:
        raise WdstudyError(f"WDSTUDY_STORAGE_OUTAGE={raw!r}: must be >= 0 seconds")
    return value


class StorageFault(WdstudyError):
    """The storage stopped the work: not the user's input, not a bug. Exit 1, one line."""


class StorageUnwritable(StorageFault):
    """The storage (or an export) cannot be written: a full disk, a quota, a read-only or
    forbidden path. ``what`` says what, with the reason (``cannot write PATH: REASON``, the
    failure reason of a trial it stops); ``code`` is the error's ``errno``."""

    what: str = ""
    code: int | None = None


class StorageOutage(StorageFault):
    """The storage stayed unreachable for longer than the outage window."""


class StorageUnreachable(WdstudyError):
    """The storage could not be opened for a reason that may pass (its server is down)."""


class StorageDisconnected(Exception):
    """A transient error inside a :func:`retry_block`: the block is run again."""


def _chain(exc: BaseException):
    seen = 0
    while exc is not None and seen < 8:
        yield exc
        exc = exc.__cause__ or exc.__context__
        seen += 1


def classify(exc: BaseException) -> str | None:
    """``"unwritable"``, ``"transient"`` or None (anything else: not the storage's fault)."""
    import sqlalchemy.exc as sa

    try:
        import psycopg
        pg_errors: tuple = (psycopg.OperationalError, psycopg.InterfaceError)
    except ImportError:  # pragma: no cover - psycopg is a dependency
        pg_errors = ()
    for e in _chain(exc):
        if isinstance(e, (StorageDisconnected, StorageUnreachable)):
            return "transient"
        if isinstance(e, WdstudyError):  # already decided (a full disk, a damaged journal, a bad URL)
            return None
        if isinstance(e, OSError) and e.errno in UNWRITABLE:
            return "unwritable"
        if isinstance(e, OSError) and e.errno in TRANSIENT_OS:
            return "transient"
        if isinstance(e, (sa.OperationalError, sa.InterfaceError, sa.DisconnectionError, sa.TimeoutError,
                          *pg_errors)):
            text = str(e).lower()
            if "authentication failed" in text or "does not exist" in text and "database" in text:
                return None  # a wrong password or database name does not heal by waiting
            return "transient"
    return None


def reason(exc: BaseException) -> str:
    """The deepest one-line cause of ``exc`` that says something, secrets masked."""
    best = None
    for e in _chain(exc):
        if isinstance(e, OSError) and e.strerror:
            where = f"{e.filename}: " if e.filename else ""
            return scrub(f"{where}{e.strerror}")
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip() not in ("", "()")]
        if lines:
            best = lines[0]
    return scrub(best or type(exc).__name__)


def unwritable(exc: BaseException, what: str) -> StorageUnwritable:
    fault = StorageUnwritable(f"cannot write {what}: {reason(exc)}; free space (or fix the permission) and run "
                              "the same command to resume")
    fault.what = f"cannot write {what}: {reason(exc)}"
    fault.code = next((e.errno for e in _chain(exc) if isinstance(e, OSError) and e.errno in UNWRITABLE), None)
    return fault


def full(fault: BaseException) -> bool:
    """Whether ``fault`` is a full disk or a quota (the disk reserve makes room), not a forbidden path."""
    return isinstance(fault, StorageUnwritable) and fault.code in (errno.ENOSPC, errno.EDQUOT)


# -- the outage, seen once per process --------------------------------------------------------------

class _Outage:
    """Whether this process sees the storage as down: logs its start and end once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since: float | None = None
        self.recovered_at = 0.0  # wall clock: leases are judged from here after an outage

    def down(self, label: str, exc: BaseException, log: Callable[[str], None]) -> float:
        with self.lock:
            if self.since is None:
                self.since = time.monotonic()
                log(f"wdstudy: storage {label} unreachable ({reason(exc)}); waiting for it, up to "
                    f"{outage_window():.0f} s (WDSTUDY_STORAGE_OUTAGE)")
            return self.since

    def up(self, label: str, log: Callable[[str], None]) -> None:
        with self.lock:
            if self.since is not None:
                log(f"wdstudy: storage {label} reachable again after {time.monotonic() - self.since:.1f} s")
                self.since = None
                self.recovered_at = time.time()


OUTAGE = _Outage()


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _backoff(attempt: int) -> float:
    return min(10.0, 0.25 * 2 ** attempt) * random.uniform(0.5, 1.0)


_local = threading.local()


@contextlib.contextmanager
def no_retry():
    """Within the block, a transient error raises :class:`StorageDisconnected` at once."""
    depth = getattr(_local, "depth", 0)
    _local.depth = depth + 1
    try:
        yield
    finally:
        _local.depth = depth


def holding(lock) -> None:
    """While a study lock is held by this thread, every write first checks the lock is still
    held (a PostgreSQL advisory lock ends with its session, e.g. in a server restart)."""
    _local.lock = lock


def wait_out(label: str, exc: BaseException, attempt: int, log: Callable[[str], None] = _stderr) -> None:
    """Sleep before the next attempt, or raise :class:`StorageOutage` past the window."""
    since = OUTAGE.down(label, exc, log)
    window = outage_window()
    if time.monotonic() - since > window:
        raise StorageOutage(f"storage {label} unreachable for {time.monotonic() - since:.0f} s, longer than "
                            f"WDSTUDY_STORAGE_OUTAGE={window:g} s ({reason(exc)}); stopped. Run the same "
                            "command to resume once it is back") from None
    from .signals import STOP, stopped

    if STOP.pending is not None:  # asked to stop during the outage: do not wait out the window
        raise stopped(STOP.pending, " during a storage outage")
    time.sleep(min(_backoff(attempt), max(0.05, window - (time.monotonic() - since) + 0.05)))


def retry_block(block: Callable[[], Any], url: str, before_retry: Callable[[], None] | None = None,
                log: Callable[[str], None] = _stderr) -> Any:
    """Run ``block`` (which takes the study lock and changes the storage); run it again from
    the start after a transient error, within the outage window. ``before_retry`` runs
    (inside the retry, errors and all) before each new attempt."""
    label = redact(url)
    attempt = 0
    while True:
        try:
            with no_retry():
                if attempt and before_retry is not None:
                    before_retry()
                result = block()
        except Exception as exc:
            kind = classify(exc)
            if kind == "unwritable":
                raise unwritable(exc, label) from None
            if kind != "transient":
                raise
            wait_out(label, exc, attempt, log)
            attempt += 1
            continue
        OUTAGE.up(label, log)
        return result


# -- the storage wrapper --------------------------------------------------------------------------

_STATE_CHANGES = {"set_trial_state_values"}
_WRITES = ("set_", "create_", "delete_")
_CLASS = None


def retrying(inner, url: str, log: Callable[[str], None] = _stderr):
    """``inner`` (any Optuna storage) wrapped in :class:`RetryingStorage`."""
    return _retrying_class()(inner, url, log)


def _retrying_class():
    """The wrapper class, built on first use: the launcher imports no optuna before its workers start."""
    global _CLASS, RetryingStorage
    if _CLASS is not None:
        return _CLASS
    from optuna.storages import BaseStorage

    class RetryingStorage(BaseStorage):
        """Any Optuna storage, each call retried through an outage (see the module's description)."""

        def __init__(self, inner: BaseStorage, url: str, log: Callable[[str], None] = _stderr):
            self._inner = inner
            self._url = url
            self._label = redact(url)
            self._log = log

        def __getattr__(self, name: str):  # anything else (a backend's own attributes)
            if name == "_inner":
                raise AttributeError(name)
            return getattr(self._inner, name)

        def _call(self, name: str, *args, **kwargs):
            fn = getattr(self._inner, name)
            attempt = 0
            while True:
                try:
                    lock = getattr(_local, "lock", None)
                    if lock is not None and name.startswith(_WRITES):
                        lock.check()  # a lock lost in an outage protects nothing: rerun the block
                    result = fn(*args, **kwargs)
                except Exception as exc:
                    import optuna

                    if attempt and name in _STATE_CHANGES and isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                        if self._already(*args, **kwargs):  # the first attempt reached the database
                            OUTAGE.up(self._label, self._log)
                            return True
                    kind = classify(exc)
                    if kind == "unwritable":
                        raise unwritable(exc, self._label) from None
                    if kind != "transient":
                        if "://" not in self._url and _damaged_journal(exc):
                            from .journal import damage_error

                            raise damage_error(self._url, exc) from None
                        raise
                    if getattr(_local, "depth", 0):
                        raise StorageDisconnected(reason(exc)) from exc
                    wait_out(self._label, exc, attempt, self._log)
                    attempt += 1
                    continue
                if attempt:
                    OUTAGE.up(self._label, self._log)
                return result

        def _already(self, trial_id: int, state, values=None) -> bool:
            t = self._inner.get_trial(trial_id)
            same_values = values is None or (t.values is not None and list(t.values) == list(values))
            return t.state == state and same_values

    for _name in dir(BaseStorage):
        if not _name.startswith("_") and callable(getattr(BaseStorage, _name)):
            setattr(RetryingStorage, _name, _forward(_name))
    RetryingStorage.__abstractmethods__ = frozenset()
    _CLASS = RetryingStorage
    return _CLASS


def _damaged_journal(exc: BaseException) -> bool:
    import json

    return isinstance(exc, json.JSONDecodeError) or isinstance(exc, ValueError) and str(exc) == "Invalid log format."


def _forward(name: str):
    def method(self, *args, **kwargs):
        return self._call(name, *args, **kwargs)

    method.__name__ = name
    method.__doc__ = None
    return method


RetryingStorage = None  #: the wrapper class, once built (see :func:`retrying`)
