"""The journal file, kept readable through torn writes, crashes and full disks.

Optuna's journal (``OUTPUT/optuna.journal``) is one JSON record per line, appended under a
file lock. A write cut short — a full disk, a killed process, a crashed host, a network file
system — leaves half a record at the end. Optuna skips an incomplete *last* line, but the
next append lands after it, and from then on every open fails on the damaged line in the
middle. A write-ahead log's answer is to truncate to the last complete record; so here:

* :class:`JournalBackend` appends as Optuna does, with two guards under the journal's lock:
  before writing, a damaged tail (an incomplete or undecodable last record) is moved to
  ``optuna.journal.torn-<timestamp>`` (kept, never deleted) and the file truncated to its
  last complete record, with one line saying so; and a write that fails (``ENOSPC``) is
  undone at once, so a full disk leaves no half record behind.
* A damaged record in the *middle* (written by something else, or by an older version)
  stops any open with one line naming the byte offset and the command that repairs it:
  ``python -m wdstudy repair SPEC`` (:func:`repair`), which keeps every complete record —
  including a complete record written right after a torn one on the same line — and sets the
  damaged bytes aside in a ``.torn-<timestamp>`` file, after a confirmation.

**The disk reserve.** A full disk stops the workers (:mod:`wdstudy.outage`), but each should
first fail its running trial with the reason — a write to the full disk. So a small file of
:data:`RESERVE_BYTES` lies beside the journal, ``optuna.journal.wdstudy-reserve``
(:func:`reserve_path`): made (or made whole again) by every launch and worker when it opens
the study and the disk has room (:func:`keep_reserve`), and deleted by a worker whose failure
record does not fit either (``ENOSPC`` / ``EDQUOT``; :func:`release_reserve`), which frees room
for the failure records of a few workers. A worker takes a new unit only with the reserve whole
(it makes it whole again if the disk has room): once it is spent, the other workers stop at their
next reservation instead of filling its room with new work. It holds random bytes (a compressing file system still
counts them), is no part of the study, and ``repair`` refuses it.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from optuna.storages.journal import JournalFileBackend
from optuna.storages.journal._file import get_lock_file

from .errors import WdstudyError

_RECORD_START = b'{"op_code":'
RESERVE_SUFFIX = ".wdstudy-reserve"
#: Size of the disk reserve beside a journal: room for the failure records (reason, kind, state and
#: the re-queued trial, about 2 kB) of a few workers stopped by a full disk at once, page by page.
RESERVE_BYTES = 48 * 1024


def _say(msg: str) -> None:
    print(f"wdstudy: {msg}", file=sys.stderr, flush=True)


def _complete(line: bytes) -> bool:
    """A whole record: ends with a newline and decodes to a JSON object."""
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        return False


def _set_aside(path: str, pieces: list[bytes]) -> str:
    """Write the damaged bytes to ``PATH.torn-<timestamp>`` (fsynced) and return its name."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    target = f"{path}.torn-{stamp}-{os.getpid()}"
    n = 0
    while os.path.exists(target):
        n += 1
        target = f"{path}.torn-{stamp}-{os.getpid()}-{n}"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for p in pieces:
            _write_all(fd, p)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)
    return target


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _line_start(f, end: int) -> int:
    """Offset just after the last newline before ``end`` (0 if none)."""
    pos = end
    while pos > 0:
        size = min(65536, pos)
        f.seek(pos - size)
        chunk = f.read(size)
        i = chunk.rfind(b"\n")
        if i >= 0:
            return pos - size + i + 1
        pos -= size
    return 0


def heal_tail(path: str, say: Callable[[str], None] = _say) -> int:
    """Move an incomplete or undecodable last record aside and truncate to the last complete
    one; returns the number of bytes set aside (0 when the tail is whole). Call it holding
    the journal's lock."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return 0
        f.seek(size - 1)
        if f.read(1) == b"\n":
            start = _line_start(f, size - 1)
            f.seek(start)
            if _complete(f.read(size - start)):
                return 0
        else:
            start = _line_start(f, size)
        f.seek(start)
        tail = f.read(size - start)
        target = _set_aside(path, [tail])
        f.truncate(start)
        f.flush()
        os.fsync(f.fileno())
    say(f"{path}: its last record was incomplete ({len(tail)} bytes at byte {start}, a write cut short); "
        f"moved to {target}, every complete record is kept")
    return len(tail)


def _tail_whole(path: str) -> bool:
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return True
        f.seek(size - 1)
        if f.read(1) != b"\n":
            return False
        start = _line_start(f, size - 1)
        f.seek(start)
        return _complete(f.read(size - start))


def heal_on_open(path: str, say: Callable[[str], None] = _say) -> None:
    """Heal a damaged tail before the journal is read (the lock is taken only if it looks damaged:
    a reader on a read-only copy of a whole journal writes nothing)."""
    if os.path.getsize(path) and not _tail_whole(path):
        with get_lock_file(JournalFileBackend(path)._lock):  # an append in progress finishes first
            heal_tail(path, say)


class JournalBackend(JournalFileBackend):
    """Optuna's journal file backend, with a damaged tail healed before each append and a
    failed append undone (see the module's description)."""

    def __init__(self, file_path: str, say: Callable[[str], None] = _say):
        super().__init__(file_path)
        self._say = say

    def append_logs(self, logs: list[dict]) -> None:
        data = ("\n".join(json.dumps(log, separators=(",", ":")) for log in logs) + "\n").encode("utf-8")
        with get_lock_file(self._lock):
            heal_tail(self._file_path, self._say)
            fd = os.open(self._file_path, os.O_WRONLY | os.O_APPEND)
            try:
                start = os.fstat(fd).st_size
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                except OSError:  # a full disk, a quota: leave no half record behind
                    try:
                        os.ftruncate(fd, start)
                    except OSError:
                        pass  # the next append's heal_tail sets it aside
                    raise
            finally:
                os.close(fd)


# -- the disk reserve ---------------------------------------------------------------------------

def reserve_path(journal: str) -> str:
    """The disk reserve of the journal at ``journal`` (see the module's description)."""
    return f"{journal}{RESERVE_SUFFIX}"


def is_reserve(path: str) -> bool:
    return str(path).endswith(RESERVE_SUFFIX)


def keep_reserve(journal: str, size: int = RESERVE_BYTES, strict: bool = False) -> bool:
    """Make the disk reserve beside ``journal`` whole (``size`` bytes) if the disk has room; True
    if it is. A disk without room gets none and keeps no partial one; with ``strict``, the error
    is raised (``OSError``: ``ENOSPC``, ...). Call it holding the study lock."""
    path = reserve_path(journal)
    try:
        if os.path.getsize(path) >= size:
            return True
    except OSError:
        pass
    fresh = f"{path}.new"  # one name (the study lock is held): a process killed here leaves no litter behind
    try:
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _write_all(fd, os.urandom(size))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(fresh, path)
    except OSError as exc:  # a full disk, a read-only folder: no reserve, nothing left behind
        try:
            os.unlink(fresh)
        except OSError:
            pass
        if strict:
            raise OSError(exc.errno, exc.strerror) from None  # the journal's error, not the reserve's name
        return False
    return True


def release_reserve(journal: str) -> bool:
    """Delete the disk reserve beside ``journal`` (its room goes to the failure records); True if
    there was one."""
    try:
        os.unlink(reserve_path(journal))
    except OSError:
        return False
    return True


# -- damage in the middle: finding it, repairing it -------------------------------------------------

@dataclass
class Scan:
    """A journal's bytes split into the records to keep and the damaged pieces (offset, bytes)."""

    size: int
    records: int = 0
    kept: list[bytes] = field(default_factory=list)
    damaged: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def first_damage(self) -> int | None:
        return self.damaged[0][0] if self.damaged else None


def scan(data: bytes) -> Scan:
    """Every line of the journal checked: complete records are kept; a line that does not
    decode is damaged, except for a complete record that starts inside it (a torn write
    followed by the next writer's record on the same line), which is kept."""
    out = Scan(len(data))
    pos = 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        end = len(data) if nl < 0 else nl + 1
        line = data[pos:end]
        if _complete(line):
            out.kept.append(line)
            out.records += 1
        else:
            cut = line.find(_RECORD_START, 1)
            while cut > 0 and not _complete(line[cut:]):
                cut = line.find(_RECORD_START, cut + 1)
            if cut > 0:
                out.damaged.append((pos, line[:cut]))
                out.kept.append(line[cut:])
                out.records += 1
            else:
                out.damaged.append((pos, line))
        pos = end
    return out


def damage_error(path: str, exc: BaseException | None = None) -> WdstudyError:
    """The one-line error for a journal that Optuna cannot read: where, and how to repair it."""
    try:
        with open(path, "rb") as f:
            s = scan(f.read())
    except OSError as err:
        return WdstudyError(f"storage={path!r}: cannot read ({err.strerror})")
    where = f"the record at byte {s.first_damage} is damaged" if s.damaged else f"cannot be read ({exc})"
    return WdstudyError(f"storage={path!r}: {where}; `python -m wdstudy repair SPEC_OR_JOURNAL` sets the "
                        "damaged bytes aside and keeps every complete record")


def repair(path: str, confirm: Callable[[str], bool], say: Callable[[str], None] = print) -> int:
    """Set the damaged pieces of the journal at ``path`` aside, keeping every complete record.

    ``confirm(question)`` is asked before anything changes. Returns the number of damaged
    pieces set aside: 0 when there was nothing to repair, -1 when not confirmed.
    """
    from .storage import StudyLock

    with open(path, "rb") as f:
        found = scan(f.read())
    if not found.damaged:
        say(f"{path}: {found.records} records, none damaged; nothing to repair")
        return 0
    for offset, piece in found.damaged:
        kind = "an incomplete record" if not piece.endswith(b"\n") else "a record that does not decode"
        say(f"  byte {offset}: {len(piece)} bytes, {kind}")
    if not confirm(f"{path}: set {len(found.damaged)} damaged piece(s) aside and keep the "
                   f"{found.records} complete records?"):
        say("nothing changed")
        return -1
    backend = JournalFileBackend(path)
    with StudyLock(path, ""), get_lock_file(backend._lock):
        with open(path, "rb+") as f:
            found = scan(f.read())  # again, under the locks
            if not found.damaged:
                say(f"{path}: nothing to repair any more")
                return 0
            target = _set_aside(path, [piece for _, piece in found.damaged])
            first = found.first_damage
            kept_before = 0
            keep_from = 0
            for line in found.kept:  # the records before the first damage stay where they are
                if kept_before + len(line) > first:
                    break
                kept_before += len(line)
                keep_from += 1
            f.seek(kept_before)
            for line in found.kept[keep_from:]:
                f.write(line)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    say(f"{path}: {len(found.damaged)} damaged piece(s) ({sum(len(p) for _, p in found.damaged)} bytes) moved to "
        f"{target}; {found.records} complete records kept")
    return len(found.damaged)
