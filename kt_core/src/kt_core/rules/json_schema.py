"""The JSON Schema of rule files for the installed plugins.

Editors with a YAML language server complete and check rule files against it
(``# yaml-language-server: $schema=kt-rules.schema.json``). The schema enumerates every
registered operator and match class, and uses ``if``/``then`` on ``replace.class`` so the
kwargs of each operator are checked against that operator's own kwargs model, with the
backend names and backend kwargs of the dispatching wrappers included.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from kt_core.operator_kwargs import DefaultKwargs
from kt_core.registry import OperatorKind, OperatorSpec, Registry
from kt_core.rules.loader import DEFAULT
from kt_core.rules.schema import MatchSpec

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


def _model_schema(model: type[BaseModel], defs: dict[str, Any]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/$defs/{model}")
    defs.update(schema.pop("$defs", {}))
    return schema


def _kwargs_schema(spec: OperatorSpec, registry: Registry, defs: dict[str, Any]) -> dict[str, Any]:
    schema = _model_schema(spec.kwargs_model, defs)
    if spec.dispatches_to is None:
        return schema
    backends = [registry.operators[n] for n in sorted(registry.operators) if registry.operators[n].kind == spec.dispatches_to]
    names = registry.operator_names(spec.dispatches_to)
    props = schema.setdefault("properties", {})
    for key in ("generate_op", "prefill_op"):
        if key in props:
            props[key] = {**props[key], "enum": names + ([None] if key == "prefill_op" else [])}
            props[key].pop("anyOf", None)
            props[key].pop("type", None)
    for backend in backends:
        for name, prop in _model_schema(backend.kwargs_model, defs).get("properties", {}).items():
            props.setdefault(name, {**prop, "description": f"({backend.name}) {prop.get('description', '')}".strip()})
    schema["additionalProperties"] = False
    return schema


def rules_json_schema(registry: Registry) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a rule file, for everything installed."""
    defs: dict[str, Any] = {}
    modules = [registry.operators[n] for n in sorted(registry.operators) if registry.operators[n].kind == OperatorKind.MODULE]
    class_names = [DEFAULT] + [n for s in modules for n in (s.name, *s.aliases)]
    conditions = [
        {
            "if": {"properties": {"class": {"const": DEFAULT}}},
            "then": {"properties": {"kwargs": _model_schema(DefaultKwargs, defs)}},
        }
    ]
    for spec in modules:
        kwargs = _kwargs_schema(spec, registry, defs)
        conditions.append(
            {"if": {"properties": {"class": {"enum": [spec.name, *spec.aliases]}}}, "then": {"properties": {"kwargs": kwargs}}}
        )
    match = _model_schema(MatchSpec, defs)
    match["properties"]["class"] = {
        "description": match["properties"]["class"].get("description", ""),
        "enum": registry.class_names(),
    }
    match["anyOf"] = [{"required": ["name"]}, {"required": ["class"]}]
    rule = {
        "type": "object",
        "additionalProperties": False,
        "required": ["match", "replace"],
        "properties": {
            "match": match,
            "replace": {
                "type": "object",
                "additionalProperties": False,
                "required": ["class"],
                "properties": {
                    "class": {"enum": class_names, "description": "Registered operator, or 'default' to keep the module."},
                    "kwargs": {"type": ["object", "null"]},
                },
                "allOf": conditions,
            },
            "recursive": {"type": "boolean", "default": True},
        },
    }
    schema: dict[str, Any] = {
        "$schema": SCHEMA_DIALECT,
        "title": "kt rule file",
        "description": "Injection rules: the first rule (in file order) that matches a module decides it.",
        "type": "array",
        "items": rule,
    }
    if defs:
        schema["$defs"] = defs
    return schema
