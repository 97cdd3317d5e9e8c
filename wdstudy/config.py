"""Validation of plain-data configuration with errors a person can act on.

pydantic checks the types and bounds; :func:`validate` turns its report into a
:class:`~wdstudy.errors.WdstudyError` with one line per real problem, each naming the
file (if any), the key path in the spec's own terms and the offending value — never
pydantic's internal names. Where a field may take one of several shapes (one λ range, or
one per regularizer), only the shape the input comes closest to is reported; a misspelt
key or name gets the closest valid one ("did you mean epochs?").
"""

from __future__ import annotations

import difflib
import typing
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from .errors import WdstudyError

M = TypeVar("M", bound=BaseModel)


def did_you_mean(word: object, choices, cutoff: float = 0.6) -> str:
    """``"; did you mean X?"`` for the choice closest to ``word``, or ``""``."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=cutoff)
    return f"; did you mean {close[0]}?" if close else ""


def _is_branch(part: object) -> bool:
    """A location part that names a union member (``function-after[...]``, ``dict[str,...]``), not a key."""
    return isinstance(part, str) and ("[" in part or part in ("int", "float", "str", "bool", "list", "dict"))


def _merge_typos(errors: list[dict]) -> list[dict]:
    """A misspelt key is one problem, not two: drop "X: required key missing" where the same mapping
    has an unknown key close to X (which says "did you mean X?")."""
    missing = {(e["loc"][:-1], e["loc"][-1]): e for e in errors
               if e["type"] == "missing" and e["loc"] and isinstance(e["loc"][-1], str)}
    drop = set()
    for e in errors:
        if e["type"] == "extra_forbidden" and e["loc"] and isinstance(e["loc"][-1], str):
            names = [k for parent, k in missing if parent == e["loc"][:-1]]
            close = difflib.get_close_matches(e["loc"][-1], names, n=1, cutoff=0.6)
            if close:
                drop.add(id(missing[(e["loc"][:-1], close[0])]))
    return [e for e in errors if id(e) not in drop]


def _pick_branches(errors: list[dict]) -> list[dict]:
    """Where an input failed every member of a union, keep the member with the fewest errors (the
    shape the input was closest to) and drop the member tags from every location."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for err in errors:
        loc = err["loc"]
        i = next((k for k, p in enumerate(loc) if _is_branch(p)), None)
        if i is not None:
            groups.setdefault(tuple(loc[:i]), {}).setdefault(loc[i], []).append(err)
    drop = set()
    for branches in groups.values():
        # fewest errors; among those, the member the input got furthest into (a mapping given to
        # `int | SeedRounds` is meant as the rounds); then the first member, as written in the model
        best = min(branches.values(), key=lambda b: (len(b), -max(len(e["loc"]) for e in b)))
        drop |= {id(e) for b in branches.values() if b is not best for e in b}
    return [{**e, "loc": tuple(p for p in e["loc"] if not _is_branch(p))} for e in errors if id(e) not in drop]


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold (through Optional, unions, lists and dicts)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        out += _models(arg)
    return out


def _keys_at(model: type[BaseModel], loc: tuple) -> list[str]:
    """The keys a mapping at ``loc`` (inside ``model``) may have, for suggestions."""
    current = [model]
    for part in loc:
        if isinstance(part, int):
            continue  # a list index: the list's models
        nxt = [m2 for m in current if part in m.model_fields for m2 in _models(m.model_fields[part].annotation)]
        # else a key of a mapping of models (a regularizer's own λ range): the same models below it
        current = nxt or (current if part not in {k for m in current for k in m.model_fields} else [])
    return sorted({k for m in current for k in m.model_fields})


def _message(err: dict, model: type[BaseModel] | None) -> str:
    kind, ctx, msg = err["type"], err.get("ctx") or {}, err["msg"]
    if kind == "extra_forbidden":
        return "unknown key" + (did_you_mean(err["loc"][-1], _keys_at(model, err["loc"][:-1])) if model else "")
    if kind == "missing":
        return "required key missing"
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}
    if kind in bounds:
        bound = next(iter(ctx.values()))
        return f"must be {bounds[kind]} {bound:g}" if isinstance(bound, (int, float)) else f"must be {bounds[kind]} {bound}"
    if kind == "literal_error":
        expected = str(ctx.get("expected", "")).replace(" or ", ", ")
        choices = [c.strip().strip("'") for c in expected.split(",")]
        return f"choose one of {expected}" + did_you_mean(err.get("input"), choices)
    if kind in ("int_parsing", "int_type", "int_from_float"):
        return "must be a whole number"
    if kind in ("float_parsing", "float_type", "finite_number"):
        return "must be a (finite) number"
    if kind in ("bool_parsing", "bool_type"):
        return "must be true or false"
    if kind in ("string_type",):
        return "must be a text"
    if kind in ("list_type",):
        return "must be a list"
    if kind in ("dict_type", "model_type", "model_attributes_type"):
        return "must be a mapping of keys"
    if kind == "too_short":
        return "must list at least one"
    if kind == "string_too_short":
        return "must not be empty"
    if msg.startswith("Value error, "):
        return msg[len("Value error, "):]
    return msg


def format_validation_error(exc: ValidationError, where: str | None = None,
                            model: type[BaseModel] | None = None) -> str:
    lines = []
    errors = _pick_branches(_merge_typos(exc.errors()))
    # a fixed-length pair given a wrong value: its first position says it; "position 1 missing" is noise
    told = {e["loc"][:-1] for e in errors if e["loc"] and isinstance(e["loc"][-1], int) and e["type"] != "missing"}
    errors = [e for e in errors if not (e["type"] == "missing" and e["loc"] and isinstance(e["loc"][-1], int)
                                        and e["loc"][:-1] in told)]
    for err in errors:
        path = ".".join(str(p) for p in err["loc"])
        msg = _message(err, model)
        value = err.get("input")
        # a whole mapping (a check across keys) is not repeated: its message names the keys
        shown = "" if err["type"] == "missing" or isinstance(value, dict) else f"={value!r}"
        prefix = f"{where}: " if where else ""
        line = f"{prefix}{path}{shown}: {msg}" if path else f"{prefix}{msg}"
        if line not in lines:
            lines.append(line)
    return "\n".join(lines)


def validate(model: type[M], data: Any, where: str | None = None) -> M:
    """``model.model_validate(data)``, raising WdstudyError with a readable message."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise WdstudyError(format_validation_error(exc, where, model)) from None
