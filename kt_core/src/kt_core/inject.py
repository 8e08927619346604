"""Applying a plan: replace modules with the operators the plan chose.

Replacement goes outermost first. An injected module adopts its original's children, so
after an outer module is replaced its submodules are still found at the same dotted
names and inner replacements (``recursive: true``) proceed unchanged. Operators are
constructed on the model's ``meta`` tensors and read no weights: `load()` does that.
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from kt_core.errors import KtUserError
from kt_core.injected import BaseInjectedModule
from kt_core.planner import DEVICE_KWARGS, Plan
from kt_core.registry import Registry
from kt_core.rules.diagnostics import Diagnostic, RuleFileError
from kt_core.weights.source import WeightSource


def check_replacements(model: nn.Module, plan: Plan, registry: Registry) -> list[Diagnostic]:
    """Errors for every module the plan gives to an operator that cannot replace it.

    Also checks that each operator runs on the device type it is placed on. The same
    problem in every layer is reported once, naming the first module and the count.
    """
    found: dict[tuple[int, str], list[str]] = {}
    for decision in plan.replacements():
        assert decision.rule is not None
        spec = registry.resolve_operator(decision.operator)
        devices = {decision.kwargs.get(k) for k in DEVICE_KWARGS if k != "out_device"} | {decision.device}
        for device in sorted(d for d in devices if d):
            if device.split(":")[0] not in spec.devices:
                remap = " (use --device-map to remap)" if "cuda" in device else ""
                reason = f"{spec.name} cannot run on {device}; it runs on {', '.join(spec.devices)}{remap}"
                found.setdefault((decision.rule, reason), []).append(decision.module)
        reason = spec.load_class().accepts(model.get_submodule(decision.module))
        if reason is not None:
            found.setdefault((decision.rule, reason), []).append(decision.module)
    problems = []
    for (rule_index, reason), modules in found.items():
        more = f" (and {len(modules) - 1} more modules)" if len(modules) > 1 else ""
        location = plan.rules.rules[rule_index].location
        problems.append(Diagnostic(location, f"{modules[0]}{more}: {reason}", rule=rule_index))
    return problems


def inject(
    model: nn.Module,
    plan: Plan,
    *,
    config: PretrainedConfig,
    source: WeightSource | None,
    registry: Registry,
) -> list[BaseInjectedModule]:
    """Replace the planned modules of `model` in place; return the new operators in plan order."""
    problems = check_replacements(model, plan, registry)
    if problems:
        raise RuleFileError(problems)
    created: list[BaseInjectedModule] = []
    for decision in plan.replacements():
        assert decision.rule is not None
        rule = plan.rules.rules[decision.rule]
        spec = registry.resolve_operator(decision.operator)
        original = model.get_submodule(decision.module)
        kwargs = {k: v for k, v in decision.kwargs.items() if k != "generate_device"}
        if spec.dispatches_to is not None:
            kwargs["registry"] = registry
            kwargs["backend_kwargs"] = rule.backend_kwargs
        try:
            new = spec.load_class()(decision.module, source, config, original, generate_device=decision.device, **kwargs)
        except KtUserError:
            raise
        except TypeError as exc:
            raise TypeError(f"constructing {spec.name} for {decision.module} ({rule.describe()}): {exc}") from exc
        _set_submodule(model, decision.module, new)
        created.append(new)
    return created


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if isinstance(parent, BaseInjectedModule):
        parent.replace_child(child, new)
    else:
        parent._modules[child] = new
