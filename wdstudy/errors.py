"""The one exception type a user's mistake raises.

The command line turns a :class:`WdstudyError` into a single ``error: ...`` line on
stderr and a non-zero exit, never a traceback. Everything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import math


class WdstudyError(ValueError):
    """Bad input from the user: a field with a value it cannot take."""


def bad_value(field: str, value: object, why: str, where: str | None = None) -> WdstudyError:
    """Build the standard message: ``[where: ]field=value: why``."""
    prefix = f"{where}: " if where else ""
    return WdstudyError(f"{prefix}{field}={value!r}: {why}")


def one_line(exc: BaseException, kind: bool = True) -> str:
    """An exception in one line: ``Type: the first line of its message`` (with ``kind=False``
    the first line alone), or its type's name when it has no message."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    return f"{type(exc).__name__}: {text[0]}" if kind else text[0]


def check_number(value: object, field: str, *, positive: bool = False) -> float:
    """``value`` as a float if it is finite and >= 0 (> 0 with ``positive``), else a clear error."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise bad_value(field, value, "must be a number") from None
    if not math.isfinite(number) or number < 0 or (positive and number == 0):
        raise bad_value(field, value, f"must be a finite number {'>' if positive else '>='} 0")
    return number
