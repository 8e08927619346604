"""The planner: one decision per module, computed before anything is replaced.

`plan()` is a pure function of a model (built on the ``meta`` device), a rule set and a
device map. It walks the module tree in pre-order, exactly as the tutorial describes:

- rules are tried in file order and the first whose ``name`` regex (``re.search`` over
  the dotted path) and ``class`` (``isinstance``) both hold decides the module;
- ``default`` keeps the module and applies its kwargs (its device);
- ``recursive: false`` stops the walk: no later rule sees the submodules
  (`origin="covered"`). Below a replacing rule they belong to the operator; below
  ``default`` they stay the original modules, on the kept module's device (the
  tutorial: "whether to recursively inject this module's submodules", whatever the
  replacement);
- a module no rule decides is placed on the device of its nearest decided ancestor
  (`origin="inherited"`), which is what the tutorial's "place all previously unmatched
  layers and their submodules" rules rely on; with no decided ancestor it goes to
  `fallback_device` (``cpu``).

An operator without ``generate_device`` runs where it would have been placed by
inheritance. Rules that decide nothing are reported as warnings (errors in strict mode):
one that matches no module, one whose matches are all under a non-recursive replacement,
and one shadowed by earlier rules.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from kt_core.devices import DeviceMap
from kt_core.rules.diagnostics import Diagnostic, RuleFileError
from kt_core.rules.loader import DEFAULT, Rule, RuleSet

Origin = Literal["rule", "inherited", "covered", "root"]
DEVICE_KWARGS = ("generate_device", "prefill_device", "out_device")
TRANSFER_MAP = "transfer_map"
"""A model operator's kwarg mapping layer index → device (multi-GPU placement)."""


@dataclass(frozen=True)
class Decision:
    """What happens to one module."""

    module: str
    module_class: str
    rule: int | None
    operator: str
    device: str
    origin: Origin
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    covered_by: str | None = None

    def as_json(self) -> dict[str, Any]:
        return {
            "module": self.module,
            "class": self.module_class,
            "rule": self.rule,
            "operator": self.operator,
            "device": self.device,
            "origin": self.origin,
            "kwargs": dict(self.kwargs),
            "covered_by": self.covered_by,
        }


@dataclass(frozen=True)
class Plan:
    """Every module's decision (pre-order) and the diagnostics about the rules."""

    rules: RuleSet
    decisions: tuple[Decision, ...]
    diagnostics: tuple[Diagnostic, ...]

    def __getitem__(self, module: str) -> Decision:
        return self._by_name()[module]

    def __contains__(self, module: str) -> bool:
        return module in self._by_name()

    def _by_name(self) -> dict[str, Decision]:
        cache = self.__dict__.get("_index")
        if cache is None:
            cache = {d.module: d for d in self.decisions}
            object.__setattr__(self, "_index", cache)
        return cache

    def replacements(self) -> Iterator[Decision]:
        """Decisions that replace a module with an operator, outermost first."""
        return (d for d in self.decisions if d.origin == "rule" and d.operator != DEFAULT)

    def raise_if_strict(self) -> None:
        """Treat every warning as an error (``--strict``)."""
        if self.diagnostics:
            raise RuleFileError([Diagnostic(d.location, d.message, "error", d.rule) for d in self.diagnostics])


class _ClassMatcher:
    """Imports match classes once per plan (they are registered, never arbitrary paths)."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def matches(self, rule: Rule, module: nn.Module) -> bool:
        if rule.match_class is None:
            return True
        cls = self._classes.get(rule.match_class.name)
        if cls is None:
            cls = self._classes[rule.match_class.name] = rule.match_class.load_class()
        return isinstance(module, cls)


def _rule_matches(rule: Rule, name: str, module: nn.Module, classes: _ClassMatcher) -> bool:
    if rule.name_pattern is not None and rule.name_pattern.search(name) is None:
        return False
    return classes.matches(rule, module)


def _remap(kwargs: Mapping[str, Any], device_map: DeviceMap) -> dict[str, Any]:
    """Apply the device map to device kwargs and to the devices of a ``transfer_map``."""
    out = {}
    for key, value in kwargs.items():
        if key in DEVICE_KWARGS and value is not None:
            value = device_map.apply(value)
        elif key == TRANSFER_MAP and isinstance(value, Mapping):
            value = {layer: device_map.apply(device) for layer, device in value.items()}
        out[key] = value
    return out


def plan(
    model: nn.Module,
    rules: RuleSet,
    *,
    device_map: DeviceMap | None = None,
    fallback_device: str = "cpu",
) -> Plan:
    """Decide every module of `model` by `rules`; see the module docstring for the semantics."""
    device_map = device_map or DeviceMap()
    classes = _ClassMatcher()
    decisions: list[Decision] = []
    matched: dict[int, list[str]] = {r.index: [] for r in rules}
    decided: dict[int, int] = {r.index: 0 for r in rules}
    covered_matches: dict[int, set[str]] = {r.index: set() for r in rules}
    fallback = device_map.apply(fallback_device)
    replaced: dict[str, Decision] = {}

    # Stack of (module name, module, inherited device, covering operator module or None).
    root_name = ""
    decisions.append(Decision(root_name, type(model).__name__, None, DEFAULT, fallback, "root"))
    stack: list[tuple[str, nn.Module, str, str | None]] = [
        (name, child, fallback, None) for name, child in reversed(list(model.named_children()))
    ]
    while stack:
        name, module, inherited, covered_by = stack.pop()
        cls_name = type(module).__name__
        if covered_by is not None:
            parent = replaced[covered_by]
            for rule in rules:
                if _rule_matches(rule, name, module, classes):
                    covered_matches[rule.index].add(covered_by)
            decisions.append(Decision(name, cls_name, None, parent.operator, inherited, "covered", covered_by=covered_by))
            _push_children(stack, name, module, inherited, covered_by)
            continue

        chosen: Rule | None = None
        for rule in rules:
            if _rule_matches(rule, name, module, classes):
                matched[rule.index].append(name)
                if chosen is None:
                    chosen = rule
        if chosen is None:
            decisions.append(Decision(name, cls_name, None, DEFAULT, inherited, "inherited"))
            _push_children(stack, name, module, inherited, None)
            continue

        decided[chosen.index] += 1
        kwargs = _remap(chosen.kwargs, device_map)
        device = kwargs.get("generate_device") or inherited
        decision = Decision(name, cls_name, chosen.index, chosen.operator_name, device, "rule", kwargs)
        decisions.append(decision)
        replaced[name] = decision
        stops = not chosen.recursive
        _push_children(stack, name, module, device, name if stops else None)

    kept = {name for name, d in replaced.items() if d.operator == DEFAULT}
    diagnostics = _rule_diagnostics(rules, matched, decided, covered_matches, kept)
    return Plan(rules, tuple(decisions), tuple(diagnostics))


def _push_children(
    stack: list[tuple[str, nn.Module, str, str | None]], name: str, module: nn.Module, device: str, covered_by: str | None
) -> None:
    children = [(f"{name}.{child_name}", child, device, covered_by) for child_name, child in module.named_children()]
    stack.extend(reversed(children))


def _rule_diagnostics(
    rules: RuleSet,
    matched: dict[int, list[str]],
    decided: dict[int, int],
    covered: dict[int, set[str]],
    kept: set[str],
) -> list[Diagnostic]:
    """Warnings for rules that decide nothing; `kept` names ``default`` modules with ``recursive: false``."""
    out = []
    for rule in rules:
        if decided[rule.index]:
            continue
        if matched[rule.index]:
            shadowing = sorted(
                {r.index for r in rules if r.index < rule.index for m in matched[rule.index][:50] if m in matched[r.index]}
            )
            message = (
                f"rule {rule.index} never decides a module: every module it matches "
                f"({_sample(matched[rule.index])}) was already decided by earlier rule(s) "
                f"{', '.join(map(str, shadowing))}"
            )
        elif covered[rule.index]:
            inside = "modules kept (default)" if covered[rule.index] <= kept else "operators replaced"
            message = (
                f"rule {rule.index} matches only modules inside {inside} with "
                f"recursive: false ({_sample(sorted(covered[rule.index]))}), so it never applies"
            )
        else:
            message = f"rule {rule.index} matches no module of this model"
        out.append(Diagnostic(rule.location, message, "warning", rule.index))
    return out


def _sample(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")
