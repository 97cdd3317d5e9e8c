"""Validation of plain-data configuration with errors a person can act on.

pydantic checks the types and bounds; :func:`validate` turns its report into a
:class:`~wdstudy.errors.WdstudyError` with one line per problem, each naming the
file (if any), the key path and the offending value.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import WdstudyError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(exc: ValidationError, where: str | None = None) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        value = err.get("input")
        # a whole mapping (a check across keys) is not repeated: its message names the keys
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f"={value!r}"
        prefix = f"{where}: " if where else ""
        lines.append(f"{prefix}{path}{shown}: {msg}" if path else f"{prefix}{msg}")
    return "\n".join(lines)


def validate(model: type[M], data: Any, where: str | None = None) -> M:
    """``model.model_validate(data)``, raising WdstudyError with a readable message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WdstudyError(format_validation_error(exc, where)) from None
