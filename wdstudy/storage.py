"""Where trials live, who owns a running one, and the lock every reservation takes.

* **Embedded default**: Optuna's journal file storage (``JournalFileBackend``) at
  ``OUTPUT/optuna.journal``. Every write is an append under a file lock, so many worker
  processes on one machine share it without SQLite's "database is locked" failures and
  without a server.
* **PostgreSQL** (``postgresql://...``; ``sqlite:///PATH`` for one machine): Optuna's
  ``RDBStorage`` behind its trial cache, for workers on many machines.

**Owners and leases** (the same on every storage): a worker tags each trial it runs with
its owner ``host:pid`` and renews a lease, a wall-clock timestamp, every
:data:`LEASE_INTERVAL` seconds from a background thread (:class:`Lease`). A RUNNING trial
is *stale* (:func:`stale_reason`) when its owner is a process of this host that no
longer exists, or when its lease is older than :data:`GRACE_PERIOD` seconds — a worker
killed on another machine, a host that vanished, a restarted container, a reused pid.
Any worker fails a stale trial and re-queues it (``cells``).

:class:`StudyLock` serializes the storage changes that must not interleave — reserving a
unit, opening a generation, failing and re-queuing a trial — so budgets come out exact:
an ``flock`` on a file beside the journal, or a PostgreSQL advisory lock (both released
if the holder dies).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import records as R
from .errors import WdstudyError
from .redact import redact, remember

if TYPE_CHECKING:  # optuna is imported where it is used: launch computes a URL before it
    import optuna

    from .spec import StudySpec

#: Lease settings (seconds); overridable by environment (tests, clusters with slow storage).
LEASE_INTERVAL = float(os.environ.get("WDSTUDY_LEASE_INTERVAL", "10"))
GRACE_PERIOD = float(os.environ.get("WDSTUDY_GRACE_PERIOD", "60"))

#: This machine in trial owner tags ("host:pid"); WDSTUDY_HOSTNAME overrides it (containers that
#: share a hostname, or tests that play several machines on one).
HOST = os.environ.get("WDSTUDY_HOSTNAME") or socket.gethostname()


def default_url(output_dir: Path) -> str:
    return str((output_dir / "optuna.journal").resolve())


def is_rdb(url: str) -> bool:
    return "://" in url


def shown(path) -> str:
    """A path as a person would type it here: relative below the current folder, else absolute."""
    rel = os.path.relpath(path)
    return os.path.abspath(path) if rel.startswith("..") else rel


def resolve_url(spec: StudySpec, storage: str | None) -> str:
    """``--storage``, else ``WDSTUDY_STORAGE`` (a URL kept off the command line), else the spec's
    ``storage``, else ``OUTPUT/optuna.journal``."""
    return storage or os.environ.get("WDSTUDY_STORAGE") or spec.storage or default_url(spec.output_dir())


# -- the Optuna internals wdstudy relies on, in one place ------------------------------------------
# Optuna's public API has no trial id, study id or storage handle on its Trial, FrozenTrial,
# FrozenStudy and Study objects; these private attributes have been stable from Optuna 3 to 5 and
# are tested here with the Optuna in pyproject.toml's range (4.9 to 5.x; CI: the newest). A new
# Optuna that renames them breaks here, and only here.


def trial_id(trial) -> int:
    """The storage's id of a ``Trial`` or ``FrozenTrial`` (``_trial_id``)."""
    return trial._trial_id


def study_id(study) -> int:
    """The storage's id of a ``Study`` or ``FrozenStudy`` (``_study_id``)."""
    return study._study_id


def storage_of(study):
    """The storage a ``Study`` reads and writes (``_storage``)."""
    return study._storage


def study_trials(storage, study) -> list:
    """Every trial of a ``FrozenStudy`` (from ``storage.get_all_studies()``), without copying."""
    return storage.get_all_trials(study_id(study), deepcopy=False)


def storage_label(url: str) -> str:
    """The storage as printed: a URL with its password hidden, or a journal path as typed."""
    return (redact(url) or "") if is_rdb(url) else shown(url)


class NotLaunched(WdstudyError):
    """The storage of a study that was never launched: its journal file does not exist."""


def open_existing(url: str) -> optuna.storages.BaseStorage:
    """Open the storage of a study launched before (``status``, ``report``, ``dashboard``,
    :func:`~wdstudy.results.load_results`): a database, or a journal file that exists — opening a
    missing journal would create an empty one. Raises :class:`NotLaunched` when it does not exist."""
    if not is_rdb(url) and not Path(url).exists():
        raise NotLaunched(f"storage={url!r}: no such journal file (has the study been launched?)")
    return open_storage(url)


RDB_SCHEMES = ("postgresql", "sqlite")


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """Open the storage at ``url``: an RDB URL, or a path to a journal file.

    Every call on it rides out a short outage (:class:`~wdstudy.outage.RetryingStorage`);
    a journal's torn tail is healed before each append (:mod:`wdstudy.journal`). Errors name
    the storage with its password hidden.
    """
    import optuna

    from .outage import StorageUnreachable, classify, reason, retrying

    remember(url)
    label = redact(url)
    if is_rdb(url):
        scheme = url.split("://", 1)[0].split("+", 1)[0]
        if scheme not in RDB_SCHEMES or url.startswith("sqlite://") and not url.startswith("sqlite:///"):
            raise WdstudyError(
                f"storage={label!r}: use postgresql://USER@HOST/DB (many machines), sqlite:///PATH, "
                "or a journal file path (the default)"
            )
        try:
            with _schema_lock(url), warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                rdb = optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})
                # Optuna's trial cache: later reads fetch only new and unfinished trials
                return retrying(optuna.storages.get_storage(rdb), url)
        except Exception as exc:  # bad URL, server down, missing driver
            kind = classify(exc)
            error = StorageUnreachable if kind == "transient" else WdstudyError
            raise error(f"storage={label!r}: cannot open ({reason(exc)})") from None
    path = Path(url)
    if path.is_dir():
        raise WdstudyError(f"storage={url!r}: is a folder; give the journal file, e.g. {path / 'optuna.journal'}")
    from .journal import RESERVE_SUFFIX

    if url.endswith(RESERVE_SUFFIX):
        raise WdstudyError(f"storage={url!r}: is the journal's disk reserve, not a journal; give "
                           f"{url[: -len(RESERVE_SUFFIX)]}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WdstudyError(f"storage={url!r}: cannot create its folder ({exc.strerror})") from None
    from optuna.storages.journal import JournalStorage

    from .journal import JournalBackend, damage_error, heal_on_open
    from .outage import unwritable

    try:
        if path.is_file():
            heal_on_open(str(path))
        return retrying(JournalStorage(JournalBackend(str(path))), url)
    except ValueError as exc:  # JSONDecodeError, "Invalid log format": a damaged record mid-file
        raise damage_error(str(path), exc) from None
    except OSError as exc:
        if classify(exc) == "unwritable":
            raise unwritable(exc, str(path)) from None
        raise WdstudyError(f"storage={url!r}: cannot open ({exc.strerror or exc})") from None


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

    The worker holds it only while it reserves a unit (:meth:`~wdstudy.cells.Cells.reserve`) or
    fails one; the training runs happen outside it. ``release`` is idempotent.
    """

    def __init__(self, url: str, study: str):
        self.url = url
        self.key = int.from_bytes(hashlib.sha1(study.encode()).digest()[:8], "big", signed=True)
        self._fd: int | None = None
        self._conn: Any = None  # a SQLAlchemy connection holding the advisory lock (PostgreSQL)
        self._engine: Any = None
        self.held = False

    def acquire(self) -> None:
        if is_rdb(self.url) and self.url.startswith("postgresql"):
            import sqlalchemy

            if self._engine is None:
                self._engine = sqlalchemy.create_engine(self.url, poolclass=sqlalchemy.pool.NullPool)
            self._conn = self._engine.connect()
            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
            except BaseException:  # the connection dropped while waiting: nothing is held
                self._close()
                raise
            from .outage import holding

            holding(self)
        else:
            target = self.url.split("///", 1)[1] if is_rdb(self.url) else self.url
            lock_path = f"{target}.wdstudy-lock"
            self._fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        self.held = True

    def check(self) -> None:
        """Raise if the lock was lost (its PostgreSQL session ended: a restart, a dropped connection)."""
        if self._conn is None:
            return
        import sqlalchemy

        from .outage import StorageDisconnected

        try:
            self._conn.execute(sqlalchemy.text("SELECT 1"))
        except Exception as exc:
            raise StorageDisconnected(f"the study lock was lost ({type(exc).__name__})") from exc

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        if self._conn is not None:
            from .outage import holding

            holding(None)
        if self._conn is not None:
            import sqlalchemy

            try:
                self._conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            except Exception:  # a lost connection: its session, and the lock with it, ended on the server
                pass
            finally:
                self._close()
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def _close(self) -> None:
        try:
            self._conn.close()
        except Exception:
            pass
        self._conn = None

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


def stale_reason(trial: optuna.trial.FrozenTrial, now: float | None = None, dead_pids=None) -> str | None:
    """Why a RUNNING trial has no live owner, or None if it may still be running.

    ``dead_pids``: pids of this host known to be dead (reaped by a launcher), which
    are trusted even if the pid has been reused since.
    """
    owner = trial.system_attrs.get(R.OWNER, "")
    host, _, pid = owner.rpartition(":")
    if host == HOST and pid.isdigit():
        if (dead_pids is not None and int(pid) in dead_pids) or (dead_pids is None and not _alive(int(pid))):
            return f"worker {owner} died"
    if dead_pids is not None:
        return None
    now = time.time() if now is None else now
    lease = trial.system_attrs.get(R.LEASE)
    if lease is None and trial.datetime_start is not None:
        lease = trial.datetime_start.timestamp()
    from .outage import OUTAGE

    if lease is not None and OUTAGE.recovered_at > float(lease):
        lease = OUTAGE.recovered_at  # no one could renew a lease while the storage was down
    if lease is not None and now - float(lease) > GRACE_PERIOD:
        who = f" of {owner}" if owner else ""
        return f"lease{who} expired ({now - float(lease):.0f} s since its last renewal)"
    return None


class Lease:
    """Renew a running trial's lease every :data:`LEASE_INTERVAL` seconds from a daemon thread.

    Stops by itself when the trial has finished (for example failed by another worker
    after this one stalled for longer than the grace period). Use as a context manager.
    """

    def __init__(self, storage: optuna.storages.BaseStorage, trial_id: int, interval: float | None = None):
        self.storage = storage
        self.trial_id = trial_id
        self.interval = LEASE_INTERVAL if interval is None else interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{trial_id}", daemon=True)

    def _run(self) -> None:
        import optuna

        while not self._stop.wait(self.interval):
            try:
                self.storage.set_trial_system_attr(self.trial_id, R.LEASE, time.time())
            except optuna.exceptions.UpdateFinishedTrialError:
                return
            except Exception:  # a storage hiccup: try again at the next renewal
                continue

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
