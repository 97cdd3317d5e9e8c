"""How a worker stops: SIGINT / SIGTERM become :class:`WorkerStopped`, except where held.

A worker must never be interrupted halfway through changing the storage (reserving a
unit, recording a result, failing and re-queuing a trial): that could leave a trial
RUNNING that no one owns, or a failure that is never retried. Those blocks run inside
``with STOP.held():``; a signal arriving there is remembered and raised when the block
ends. Everywhere else (while training) the signal raises at once, the worker fails its
trial, re-queues it and exits.

SIGUSR2 stops a worker the same way, but says why: its ``launch`` stops the pool because a
storage cannot be written (:data:`STORAGE_STOP`). Its trial is then failed as a full disk's
(``fail_kind: storage``), which does not count against the trial's retries.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys

#: The signal a launch stops its workers with when a storage cannot be written (a full disk).
STORAGE_STOP = signal.SIGUSR2


class WorkerStopped(Exception):
    """Raised in a worker by SIGINT / SIGTERM (or :data:`STORAGE_STOP`), so the running trial ends
    FAILED (and is retried).

    An ``Exception`` rather than ``KeyboardInterrupt``: Lightning turns a
    KeyboardInterrupt into ``sys.exit``, which would leave the trial RUNNING.
    """

    def __init__(self, message: str, signum: int | None = None):
        super().__init__(message)
        self.signum = signum

    @property
    def by_storage(self) -> bool:
        """Stopped by its launch because a storage cannot be written (:data:`STORAGE_STOP`)."""
        return self.signum == STORAGE_STOP


def stopped(signum: int, during: str = "") -> WorkerStopped:
    """The :class:`WorkerStopped` of signal ``signum`` (``during``: where it arrived)."""
    if signum == STORAGE_STOP:
        return WorkerStopped(f"stopped by its launch{during}: a storage cannot be written", signum)
    return WorkerStopped(f"stopped by signal {signum}{during}", signum)


class StopSignal:
    """SIGINT / SIGTERM handling of one worker process."""

    def __init__(self) -> None:
        self.depth = 0
        self.pending: int | None = None

    def handler(self, signum, frame) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # once: the worker is on its way out
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(STORAGE_STOP, signal.SIG_IGN)
        # remembered even when raised: a signal that lands in a garbage collector's weakref callback
        # raises there, and Python only prints and drops that exception; the next held block re-raises
        self.pending = signum
        if self.depth:
            return
        raise stopped(signum)

    @contextlib.contextmanager
    def held(self):
        """Hold SIGINT / SIGTERM for the block; raise a held one when the outermost block ends."""
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            raise stopped(self.pending)

    @property
    def stopping(self) -> bool:
        return self.pending is not None


STOP = StopSignal()


def install() -> None:
    """Route SIGINT / SIGTERM to :data:`STOP`; die with a launcher that dies (Linux)."""
    signal.signal(signal.SIGINT, STOP.handler)
    signal.signal(signal.SIGTERM, STOP.handler)
    signal.signal(STORAGE_STOP, STOP.handler)
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
