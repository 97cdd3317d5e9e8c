"""The files a study writes for people — exports, tables, figures, the report — each appear whole.

Each is written to a temporary file of its own beside it and moved over it in one step
(:func:`replacing`): a reader (a browser, a notebook, the dashboard) never sees half a file, and
two processes writing the same output at once — two launches of one study ending together, a
report rebuilt while a launch finishes — do not collide: the last one to finish wins, whole.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to, moved over ``path`` when the block ends
    (removed instead if it raises). The file gets the permissions a plain ``open`` would give it."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """``path.write_bytes(data)``, whole or not at all (:func:`replacing`)."""
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), whole or not at all (:func:`replacing`)."""
    write_bytes(path, text.encode("utf-8"))
