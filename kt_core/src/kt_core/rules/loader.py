"""Loading a rule file: YAML → structure → names resolved in the registry → kwargs validated.

Every problem in the file is collected and reported together, each at its own
``FILE:LINE:COL``, before anything is built. The result is a `RuleSet` of immutable
`Rule` objects whose names are already resolved to registry entries.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from kt_core.errors import SourceLocation
from kt_core.operator_kwargs import DefaultKwargs, DispatchKwargs
from kt_core.registry import ModelClassSpec, OperatorSpec, Registry, UnknownNameError
from kt_core.rules.diagnostics import Diagnostic, RuleFileError
from kt_core.rules.pydantic_errors import describe
from kt_core.rules.schema import RuleSpec
from kt_core.rules.yaml_reader import locate, read_yaml, read_yaml_file

DEFAULT = "default"


@dataclass(frozen=True)
class Rule:
    """A validated rule with its names resolved.

    `operator` is None for ``replace.class: default``. `kwargs` holds the validated
    values (only those the rule file set, so later rules and inheritance can tell "set"
    from "defaulted"). `backend_kwargs` maps each backend a dispatching wrapper will
    create to the kwargs it receives.
    """

    index: int
    location: SourceLocation
    name_pattern: re.Pattern[str] | None
    match_class: ModelClassSpec | None
    replace_class: str
    operator: OperatorSpec | None
    kwargs: Mapping[str, Any]
    recursive: bool
    backend_kwargs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    @property
    def operator_name(self) -> str:
        return DEFAULT if self.operator is None else self.operator.name

    def describe(self) -> str:
        parts = []
        if self.name_pattern is not None:
            parts.append(f"name={self.name_pattern.pattern!r}")
        if self.match_class is not None:
            parts.append(f"class={self.match_class.name}")
        return f"rule {self.index} ({', '.join(parts)}) at {self.location}"


@dataclass(frozen=True)
class RuleSet:
    """The rules of one file, in file order."""

    source: str
    rules: tuple[Rule, ...]

    def __iter__(self):  # noqa: ANN204 - iterator of Rule
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)


def load_rules(path: str | Path, registry: Registry) -> RuleSet:
    """Load and validate a rule file; raise `RuleFileError` listing every problem."""
    path = Path(path)
    return _validate(read_yaml_file(path), str(path), registry)


def parse_rules(text: str, registry: Registry, filename: str = "<rules>") -> RuleSet:
    """Like `load_rules`, for rule text held in memory."""
    return _validate(read_yaml(text, filename), filename, registry)


def _validate(data: Any, filename: str, registry: Registry) -> RuleSet:
    diagnostics: list[Diagnostic] = []

    def error(path: tuple[str | int, ...], message: str, *, at_key: bool = False, rule: int | None = None) -> None:
        diagnostics.append(Diagnostic(locate(data, path, filename, at_key=at_key), message, rule=rule))

    if data is None:
        error((), "the rule file is empty; expected a list of rules (- match: … replace: …)")
        raise RuleFileError(diagnostics)
    if not isinstance(data, list):
        error((), f"expected a list of rules (- match: … replace: …), got a {type(data).__name__}")
        raise RuleFileError(diagnostics)

    rules: list[Rule] = []
    for index, item in enumerate(data):
        try:
            spec = RuleSpec.model_validate(item)
        except ValidationError as exc:
            for err in exc.errors():
                loc = (index, *err["loc"])
                # Model-level validators report at the mapping itself, not at a key.
                error(loc, describe(err, RuleSpec), at_key=err["type"] == "extra_forbidden", rule=index)
            continue
        rule = _resolve(spec, index, data, filename, registry, error)
        if rule is not None:
            rules.append(rule)

    if diagnostics:
        raise RuleFileError(diagnostics)
    return RuleSet(filename, tuple(rules))


def _resolve(spec: RuleSpec, index: int, data: Any, filename: str, registry: Registry, error: Any) -> Rule | None:
    """Resolve names and validate kwargs of one structurally valid rule."""
    ok = True
    match_class = None
    if spec.match.class_ is not None:
        try:
            match_class = registry.resolve_model_class(spec.match.class_)
        except UnknownNameError as exc:
            error((index, "match", "class"), f"match.class: {exc}", rule=index)
            ok = False

    operator = None
    replace_name = spec.replace.class_
    raw_kwargs = dict(spec.replace.kwargs or {})
    kwargs_path = (index, "replace", "kwargs")
    if replace_name != DEFAULT:
        try:
            operator = registry.resolve_operator(replace_name)
        except UnknownNameError as exc:
            error((index, "replace", "class"), f"replace.class: {exc}", rule=index)
            return None
        if operator.kind != "module":
            error(
                (index, "replace", "class"),
                f"replace.class: {operator.name} is a {operator.kind}; use it as generate_op or "
                f"prefill_op of a wrapper ({_wrappers_for(registry, operator)}), not as a replacement",
                rule=index,
            )
            return None
    kwargs_model: type[BaseModel] = DefaultKwargs if operator is None else operator.kwargs_model

    try:
        validated = kwargs_model.model_validate(raw_kwargs)
    except ValidationError as exc:
        for err in exc.errors():
            error(
                (*kwargs_path, *err["loc"]),
                f"replace.kwargs: {describe(err, kwargs_model)}",
                at_key=err["type"] == "extra_forbidden",
                rule=index,
            )
        return None

    kwargs = {k: getattr(validated, k) for k in validated.model_fields_set if k in type(validated).model_fields}
    backend_kwargs: dict[str, dict[str, Any]] = {}
    if operator is not None and operator.dispatches_to is not None and isinstance(validated, DispatchKwargs):
        extras = dict(validated.model_extra or {})
        resolved = _resolve_backends(validated, operator, extras, kwargs_path, index, registry, error)
        if resolved is None:
            return None
        backend_kwargs = resolved
        kwargs.setdefault("generate_op", validated.generate_op)
    if not ok:
        return None

    pattern = re.compile(spec.match.name) if spec.match.name is not None else None
    return Rule(
        index=index,
        location=locate(data, (index,), filename),
        name_pattern=pattern,
        match_class=match_class,
        replace_class=replace_name,
        operator=operator,
        kwargs=kwargs,
        recursive=spec.recursive,
        backend_kwargs=backend_kwargs,
    )


def _resolve_backends(
    validated: DispatchKwargs,
    wrapper: OperatorSpec,
    extras: dict[str, Any],
    kwargs_path: tuple[str | int, ...],
    index: int,
    registry: Registry,
    error: Any,
) -> dict[str, dict[str, Any]] | None:
    """Check generate_op/prefill_op name backends of the right kind; split extra kwargs among them.

    An extra kwarg must be declared by at least one chosen backend; each backend receives
    the extras it declares, validated by its own model.
    """
    assert wrapper.dispatches_to is not None
    backends: dict[str, OperatorSpec] = {}
    for key in ("generate_op", "prefill_op"):
        name = getattr(validated, key)
        if name is None:
            continue
        try:
            backends[name] = registry.resolve_operator(name, kind=wrapper.dispatches_to)
        except UnknownNameError as exc:
            error((*kwargs_path, key), f"replace.kwargs.{key}: {exc}", rule=index)
            return None

    result: dict[str, dict[str, Any]] = {}
    claimed: set[str] = set()
    failed = False
    for spec in backends.values():
        fields = spec.kwargs_model.model_fields
        mine = {k: v for k, v in extras.items() if k in fields}
        claimed |= mine.keys()
        try:
            model = spec.kwargs_model.model_validate(mine)
        except ValidationError as exc:
            for err in exc.errors():
                error((*kwargs_path, *err["loc"]), f"replace.kwargs ({spec.name}): {describe(err, spec.kwargs_model)}", rule=index)
            failed = True
            continue
        result[spec.name] = {k: getattr(model, k) for k in model.model_fields_set}
    accepted = sorted(
        set(type(validated).model_fields) | {k for s in backends.values() for k in s.kwargs_model.model_fields}
    )
    for key in sorted(extras.keys() - claimed):
        # A wrapper lets unknown keys through to its backends, so a typo of one of its own
        # keys (generate_devce) lands here and deserves the same suggestion as anywhere else.
        close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        error(
            (*kwargs_path, key),
            f"replace.kwargs: unknown key {key!r} for {wrapper.name} with "
            f"{' and '.join(backends)}{hint} (expected one of: {', '.join(accepted)})",
            at_key=True,
            rule=index,
        )
        failed = True
    return None if failed else result


def _wrappers_for(registry: Registry, backend: OperatorSpec) -> str:
    names = [s.name for s in registry.operators.values() if s.dispatches_to == backend.kind]
    return ", ".join(names) or "no wrapper installed"
