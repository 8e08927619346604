"""Turning pydantic validation errors into messages a person understands.

pydantic reports ``("replace", "kwargs", "generate_devce")`` / ``extra_forbidden``; a
user wants *"unknown key 'generate_devce'; did you mean 'generate_device'?"* at the line
where they typed it.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel
from pydantic_core import ErrorDetails


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model inside an annotation like ``Foo | None`` or ``list[Foo]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        for arg in typing.get_args(annotation):
            found = _model_in(arg)
            if found is not None:
                return found
    return None


def keys_of(model: type[BaseModel]) -> list[str]:
    """The keys a model accepts, spelled as in YAML (aliases where set)."""
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_at(model: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            return None
        if isinstance(part, int):
            continue
        root = current.model_fields.get("root")
        if root is not None:
            current = _model_in(root.annotation)
            if current is None:
                return None
        field = next((f for n, f in current.model_fields.items() if (f.alias or n) == part), None)
        current = _model_in(field.annotation) if field is not None else None
    if current is not None and "root" in current.model_fields:
        current = _model_in(current.model_fields["root"].annotation)
    return current


def describe(error: ErrorDetails, model: type[BaseModel]) -> str:
    """A one-line explanation of `error`, raised while validating `model`."""
    loc = error["loc"]
    kind = error["type"]
    key = loc[-1] if loc else None
    if kind == "extra_forbidden":
        owner = _model_at(model, loc[:-1])
        allowed = keys_of(owner) if owner is not None else []
        message = f"unknown key {key!r}"
        close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        if close:
            message += f"; did you mean {close[0]!r}?"
        if allowed:
            message += f" (expected one of: {', '.join(allowed)})"
        return message
    if kind == "missing":
        return f"missing required key {key!r}"
    text = error["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    where = ".".join(str(p) for p in loc if isinstance(p, str))
    got = error.get("input")
    suffix = "" if kind == "value_error" or isinstance(got, dict) else f", got {got!r}"
    return f"{where}: {text}{suffix}" if where else f"{text}{suffix}"
