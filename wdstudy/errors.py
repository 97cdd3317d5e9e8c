"""The one exception type a user's mistake raises.

The command line turns a :class:`WdstudyError` into a single ``error: ...`` line on
stderr and a non-zero exit, never a traceback. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations


class WdstudyError(ValueError):
    """Bad input from the user: a field with a value it cannot take."""


def bad_value(field: str, value: object, why: str, where: str | None = None) -> WdstudyError:
    """Build the standard message: ``[where: ]field=value: why``."""
    prefix = f"{where}: " if where else ""
    return WdstudyError(f"{prefix}{field}={value!r}: {why}")
