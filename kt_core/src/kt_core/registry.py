"""The registry: every name a rule file may use, and who provides it.

Plugins describe operators and model classes with an *import target* string
(``"kt_ops_torch.linear:KLinearTorch"``) that is imported only when a rule actually uses
the name. A rule's ``class`` is looked up here and nowhere else: a dotted path that no
plugin registered is rejected without being imported, so a rule file cannot make kt
import arbitrary modules.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pydantic import BaseModel

from kt_core.catalog import KNOWN_PROVIDERS, RETIRED_NAMES
from kt_core.errors import KtUserError
from kt_core.weights.family import ModelFamily


class OperatorKind(StrEnum):
    """What an operator is for: replacing a module, or serving as a wrapper's backend."""

    MODULE = "module"
    LINEAR_BACKEND = "linear-backend"
    EXPERTS_BACKEND = "experts-backend"
    HEADWISE_BACKEND = "headwise-backend"


class UnknownNameError(KtUserError):
    """A rule names an operator or class that no installed plugin registers."""


class PluginImportError(Exception):
    """A registered import target could not be imported: a broken plugin, not a user error."""


def import_target(target: str) -> Any:
    """Import ``"package.module:Attribute"``; only ever called with registered targets."""
    module_name, _, attr = target.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class OperatorSpec:
    """One registered operator.

    `kwargs_model` is a pydantic model with ``extra="forbid"`` describing the kwargs a
    rule may pass; it also feeds the exported JSON Schema. For wrappers that dispatch to
    backends, `dispatches_to` names the backend kind their ``generate_op``/``prefill_op``
    must have.
    """

    name: str
    target: str
    kind: OperatorKind
    summary: str
    kwargs_model: type[BaseModel]
    devices: tuple[str, ...] = ("cpu", "cuda")
    aliases: tuple[str, ...] = ()
    dispatches_to: OperatorKind | None = None
    device_notes: tuple[tuple[str, str], ...] = ()
    """(device type, note) pairs shown by `kt rules explain`, e.g. ("cpu", "int4, CPU path")."""
    distribution: str = ""

    def note_for(self, device: str) -> str | None:
        """What this operator does differently on `device` (``cuda:1`` matches ``cuda``), if anything."""
        kind = device.split(":", 1)[0]
        return next((note for dev, note in self.device_notes if dev == kind), None)

    def load_class(self) -> type:
        """Import the implementation (lazily, on first use by a rule)."""
        try:
            return import_target(self.target)
        except Exception as exc:  # a broken plugin: keep the cause, name the culprit
            raise PluginImportError(
                f"operator {self.name} of {self.distribution or 'an unknown distribution'} "
                f"could not be imported from {self.target}: {exc}"
            ) from exc


@dataclass(frozen=True)
class ModelClassSpec:
    """A module class that rules may match on (``match.class``)."""

    name: str
    target: str
    aliases: tuple[str, ...] = ()
    summary: str = ""
    distribution: str = ""

    def load_class(self) -> type:
        try:
            return import_target(self.target)
        except Exception as exc:
            raise PluginImportError(
                f"model class {self.name} of {self.distribution or 'an unknown distribution'} "
                f"could not be imported from {self.target}: {exc}"
            ) from exc


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose registration raised."""

    plugin: str
    error: str


@dataclass
class Registry:
    """All operators, model classes and model families of the loaded plugins."""

    operators: dict[str, OperatorSpec] = field(default_factory=dict)
    model_classes: dict[str, ModelClassSpec] = field(default_factory=dict)
    families: dict[str, ModelFamily] = field(default_factory=dict)
    failures: list[PluginFailure] = field(default_factory=list)
    distributions: dict[str, str] = field(default_factory=dict)
    """Loaded plugin distributions and their versions."""
    _operator_names: dict[str, OperatorSpec] = field(default_factory=dict)
    _class_names: dict[str, ModelClassSpec] = field(default_factory=dict)

    # -- registration -----------------------------------------------------------------

    def add_operator(self, spec: OperatorSpec) -> None:
        for name in (spec.name, *spec.aliases):
            existing = self._operator_names.get(name)
            if existing is not None and existing is not spec:
                raise ValueError(
                    f"operator name {name!r} of {spec.distribution} is already registered by "
                    f"{existing.distribution} (as {existing.name})"
                )
        self.operators[spec.name] = spec
        for name in (spec.name, *spec.aliases):
            self._operator_names[name] = spec

    def add_model_class(self, spec: ModelClassSpec) -> None:
        for name in (spec.name, *spec.aliases):
            existing = self._class_names.get(name)
            if existing is not None and existing is not spec:
                raise ValueError(
                    f"model class name {name!r} of {spec.distribution} is already registered by "
                    f"{existing.distribution} (as {existing.name})"
                )
        self.model_classes[spec.name] = spec
        for name in (spec.name, *spec.aliases):
            self._class_names[name] = spec

    def add_family(self, family: ModelFamily) -> None:
        if family.name in self.families:
            raise ValueError(
                f"model family {family.name!r} of {family.distribution} is already registered by "
                f"{self.families[family.name].distribution}"
            )
        self.families[family.name] = family

    def merge(self, other: Registry) -> None:
        """Add everything `other` registered, or nothing if any name collides."""
        probe = Registry(dict(self.operators), dict(self.model_classes), dict(self.families))
        probe._operator_names = dict(self._operator_names)
        probe._class_names = dict(self._class_names)
        for spec in other.operators.values():
            probe.add_operator(spec)
        for cls_spec in other.model_classes.values():
            probe.add_model_class(cls_spec)
        for family in other.families.values():
            probe.add_family(family)
        self.operators, self.model_classes, self.families = probe.operators, probe.model_classes, probe.families
        self._operator_names, self._class_names = probe._operator_names, probe._class_names

    # -- lookup -----------------------------------------------------------------------

    def operator_names(self, kind: OperatorKind | None = None) -> list[str]:
        """Every name (canonical and alias) of operators of `kind` (all kinds if None)."""
        return sorted(n for n, s in self._operator_names.items() if kind is None or s.kind == kind)

    def class_names(self) -> list[str]:
        return sorted(self._class_names)

    def resolve_operator(self, name: str, *, kind: OperatorKind | None = None) -> OperatorSpec:
        """The operator registered as `name`, or a `UnknownNameError` that says what to do."""
        spec = self._operator_names.get(name)
        if spec is None:
            raise UnknownNameError(self._unknown_message("operator", name, self.operator_names(kind)))
        if kind is not None and spec.kind != kind:
            raise UnknownNameError(
                f"{name!r} is {_article(str(spec.kind))} {spec.kind} operator, but {_article(str(kind))} {kind} "
                "operator is expected here; "
                f"{kind} operators: {', '.join(self.operator_names(kind)) or 'none installed'}"
            )
        return spec

    def resolve_model_class(self, name: str) -> ModelClassSpec:
        spec = self._class_names.get(name)
        if spec is None:
            raise UnknownNameError(self._unknown_message("class", name, self.class_names()))
        return spec

    def family_for_model_type(self, model_type: str) -> ModelFamily | None:
        return next((f for f in self.families.values() if model_type in f.hf_model_types), None)

    def family_for_gguf_architecture(self, arch: str) -> ModelFamily | None:
        return next((f for f in self.families.values() if arch in f.gguf_architectures), None)

    def builtin_configs(self) -> dict[str, tuple[ModelFamily, Any]]:
        """Built-in config files of every family, by Hugging Face repo id."""
        return {repo: (f, path) for f in self.families.values() for repo, path in f.builtin_configs.items()}

    def _unknown_message(self, what: str, name: str, candidates: list[str]) -> str:
        retired = RETIRED_NAMES.get(name)
        if retired is not None:
            return f"{name!r} has no counterpart in kt: {retired}"
        provider = KNOWN_PROVIDERS.get(name)
        if provider is not None:
            failure = next((f for f in self.failures if f.plugin == provider), None)
            if failure is not None:
                return f"{name!r} is provided by {provider}, which failed to load: {failure.error}"
            if provider in self.distributions:
                return (
                    f"{name!r} belongs to {provider}, but the installed version "
                    f"({self.distributions[provider]}) does not provide it yet"
                )
            return (
                f"{name!r} is provided by {provider}, which is not installed "
                f"(or is excluded by KT_PLUGINS); install it with: pip install {provider}"
            )
        message = f"unknown {what} {name!r}"
        suggestions = _suggest(name, candidates)
        if suggestions:
            message += f"; did you mean {' or '.join(repr(s) for s in suggestions)}?"
        if "." in name:
            message += (
                " (kt resolves classes only through registered names, never by importing a "
                "dotted path; `kt plugins` lists what is registered)"
            )
        elif not suggestions:
            message += "; `kt plugins` lists what is registered"
        return message


def _suggest(name: str, candidates: list[str]) -> list[str]:
    """Close registered names, comparing both full names and their last dotted part."""
    by_short: dict[str, str] = {}
    for candidate in candidates:
        by_short.setdefault(candidate.rsplit(".", 1)[-1], candidate)
    short = name.rsplit(".", 1)[-1]
    found = difflib.get_close_matches(name, candidates, n=2, cutoff=0.75)
    for match in difflib.get_close_matches(short, list(by_short), n=2, cutoff=0.7):
        full = match if match in candidates and "." not in name else by_short[match]
        if full not in found:
            found.append(full)
    return found[:3]


def _article(word: str) -> str:
    """'an' before a vowel ("an experts-backend operator"), 'a' otherwise."""
    return "an" if word[:1].lower() in "aeiou" else "a"
