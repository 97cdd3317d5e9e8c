"""Where trials live: the embedded journal file, or a shared RDB (PostgreSQL) for many machines.

* **Embedded default**: Optuna's journal file storage (``JournalFileBackend``) at
  ``OUTPUT/optuna.journal``. Every write is an append under a file lock, so many worker
  processes on one machine share it without SQLite's "database is locked" failures and
  without a server. A worker that dies is noticed by the launcher (its process) or by any
  later worker on the same host (its pid is gone); its RUNNING trial is failed and its
  parameters retried.
* **PostgreSQL** (``postgresql://...``; ``sqlite:///PATH`` for one machine): Optuna's ``RDBStorage``
  with heartbeats. A trial whose worker stops beating for ``grace_period`` seconds, on any
  machine, is failed by the next worker and retried with ``RetryHeartbeatStaleTrialCallback``.

:class:`StudyLock` serializes the one critical section of a worker, "count a cell's
trials, then create one", so that a cell ends with exactly its budget: an ``flock`` on a
file beside the journal, or a PostgreSQL advisory lock (both released if the holder dies).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
from pathlib import Path

import optuna
import warnings

from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from .errors import WdstudyError

#: Heartbeat settings for RDB storages (seconds); overridable for tests by environment.
HEARTBEAT_INTERVAL = int(os.environ.get("WDSTUDY_HEARTBEAT_INTERVAL", "10"))
GRACE_PERIOD = int(os.environ.get("WDSTUDY_GRACE_PERIOD", "60"))
MAX_RETRY = 3

#: This machine in trial owner tags ("host:pid"); WDSTUDY_HOSTNAME overrides it (containers that
#: share a hostname, or tests that play several machines on one).
HOST = os.environ.get("WDSTUDY_HOSTNAME") or socket.gethostname()


def default_url(output_dir: Path) -> str:
    return str((output_dir / "optuna.journal").resolve())


def is_rdb(url: str) -> bool:
    return "://" in url


RDB_SCHEMES = ("postgresql", "sqlite")


def retry_callback() -> RetryHeartbeatStaleTrialCallback:
    """Optuna's retry: enqueue a failed trial's parameters as a WAITING trial (at most 3 times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY, inherit_intermediate_values=False)


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage at ``url``: an RDB URL, or a path to a journal file."""
    if is_rdb(url):
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme not in RDB_SCHEMES or url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            raise WdstudyError(
                f"storage={url!r}: use postgresql://USER@HOST/DB (many machines), sqlite:///PATH, "
                "or a journal file path (the default)"
            )
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    url,
                    heartbeat_interval=HEARTBEAT_INTERVAL,
                    grace_period=GRACE_PERIOD,
                    heartbeat_stale_trial_callback=retry_callback(),
                    engine_kwargs={"pool_pre_ping": True},
                )
        except Exception as exc:  # bad URL, server down, missing driver
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WdstudyError(f"storage={url!r}: cannot open ({first})") from None
    path = Path(url)
    if path.is_dir():
        raise WdstudyError(f"storage={url!r}: is a folder; give the journal file, e.g. {path / 'optuna.journal'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WdstudyError(f"storage={url!r}: cannot create its folder ({exc.strerror})") from None
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    return JournalStorage(JournalFileBackend(str(path)))


_SCHEMA_LOCK_KEY = 0x7764_7374_7564_79  # "wdstudy"


class _schema_lock:
    """Serialize Optuna's table creation: concurrent first opens of a PostgreSQL database race."""

    def __init__(self, url: str):
        self.lock = StudyLock(url, "") if url.startswith("postgresql") else None
        if self.lock is not None:
            self.lock.key = _SCHEMA_LOCK_KEY

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()
        return self

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()


class StudyLock:
    """A lock shared by every worker of a study, on this machine or (PostgreSQL) any machine.

    ``acquire``/``release`` may be called from different places (the worker takes it
    before asking Optuna for a trial and the objective releases it as soon as the trial
    exists); ``release`` is idempotent.
    """

    def __init__(self, url: str, study: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha1(study.encode()).digest()[:8], "big", signed=True)
        self._fd: int | None = None
        self._conn = None
        self._engine = None
        self.held = False

    def acquire(self) -> None:
        if is_rdb(self.url) and self.url.startswith("postgresql"):
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        else:
            target = self.url.split("///", 1)[1] if is_rdb(self.url) else self.url
            lock_path = f"{target}.wdstudy-lock"
            self._fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conn is not None:
            import sqlalchemy

            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            finally:
                self._conn.close()
                self._conn = None
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> StudyLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def owner_tag() -> str:
    return f"{HOST}:{os.getpid()}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def fail_and_retry(study: optuna.Study, trial_id: int, number: int, reason: str) -> None:
    """Mark a RUNNING trial FAIL with ``reason`` and enqueue its parameters again.

    Does nothing if the trial has finished meanwhile (another process released it).
    """
    storage = study._storage
    if storage.get_trial(trial_id).state != TrialState.RUNNING:
        return
    try:
        storage.set_trial_system_attr(trial_id, "fail_reason", reason)
        if not storage.set_trial_state_values(trial_id, TrialState.FAIL):
            return
    except optuna.exceptions.UpdateFinishedTrialError:
        return
    retry_callback()(study, storage.get_trial(trial_id))


def release_dead_trials(storage: optuna.storages.BaseStorage, study_names: list[str], dead_pids=None) -> int:
    """Fail and retry RUNNING trials owned by processes on this host that no longer exist.

    ``dead_pids`` restricts the check to those pids (known dead, e.g. reaped children);
    otherwise each owner pid on this host is probed. Trials of other hosts are left to the
    heartbeat (RDB storages). Returns the number of trials released.
    """
    released = 0
    existing = {s.study_name for s in storage.get_all_studies()}
    for name in study_names:
        if name not in existing:
            continue
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            owner = t.system_attrs.get("owner", "")
            host, _, pid = owner.rpartition(":")
            if host != HOST or not pid.isdigit():
                continue
            pid_i = int(pid)
            if (dead_pids is not None and pid_i in dead_pids) or (dead_pids is None and not _alive(pid_i)):
                fail_and_retry(study, t._trial_id, t.number, f"worker {owner} died")
                released += 1
    return released
