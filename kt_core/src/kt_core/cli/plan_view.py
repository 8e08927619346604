"""The plan as a terminal table: which rule decided each module, the operator, the device.

Modules that differ only in numeric path parts (layer indices) and share a decision are
collapsed into one row (``model.layers.{1-26}.mlp.experts``), which keeps a 60-layer plan
readable; ``--all`` shows every module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from kt_core.cli.table import format_table
from kt_core.errors import KtUserError
from kt_core.planner import Decision, Plan
from kt_core.registry import Registry

_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)")


def group_decisions(decisions: Sequence[Decision]) -> list[dict[str, Any]]:
    """Collapse modules that differ only in numeric path parts (layer indices) into one row.

    ``model.layers.1.mlp`` … ``model.layers.26.mlp`` with the same rule, operator and
    device become ``model.layers.{1-26}.mlp``, which keeps a 60-layer plan readable.
    """
    groups: dict[tuple, dict[str, Any]] = {}
    for d in decisions:
        template = _INDEX.sub("{}", d.module)
        numbers = tuple(int(n) for n in _INDEX.findall(d.module))
        covered_template = _INDEX.sub("{}", d.covered_by) if d.covered_by else None
        key = (template, d.module_class, d.rule, d.operator, d.device, d.origin, covered_template)
        group = groups.setdefault(key, {"template": template, "decision": d, "numbers": []})
        group["numbers"].append(numbers)
    return list(groups.values())


def _ranges(values: Sequence[int]) -> str:
    values = sorted(set(values))
    parts: list[str] = []
    start = prev = values[0]
    for v in values[1:] + [None]:  # type: ignore[list-item]
        if v is not None and v == prev + 1:
            prev = v
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if v is not None:
            start = prev = v
    return ",".join(parts)


def _group_name(group: dict[str, Any]) -> str:
    template: str = group["template"]
    numbers: list[tuple[int, ...]] = group["numbers"]
    if not numbers or not numbers[0]:
        return template
    per_position = list(zip(*numbers, strict=True))
    out = template
    for values in per_position:
        shown = str(values[0]) if len(set(values)) == 1 else "{" + _ranges(list(values)) + "}"
        out = out.replace("{}", shown, 1)
    return out


def _backend_cell(name: str, device: str, registry: Registry | None) -> str:
    """``KLinearMarlin (int4, CPU path)``: the backend, with its note for the device it runs on."""
    if registry is None:
        return name
    try:
        note = registry.resolve_operator(name).note_for(device)
    except KtUserError:
        return name
    return f"{name} ({note})" if note else name


def _operator_cell(d: Decision, registry: Registry | None = None) -> str:
    if d.origin == "covered":
        return "default (inside kept module)" if d.operator == "default" else f"(inside {d.operator})"
    if d.origin == "inherited":
        return "default (inherited)"
    generate_device = d.kwargs.get("generate_device") or d.device
    # Kwargs named ``*_op`` name a registered backend: a wrapper's generate_op/prefill_op (shown
    # first, in that order), or an operator's own (MLA attention's absorb_op); only prefill_op
    # runs on the prefill device.
    prefill_device = d.kwargs.get("prefill_device") or generate_device
    names = sorted((k for k, v in d.kwargs.items() if k.endswith("_op") and v),
                   key=lambda k: (k != "generate_op", k != "prefill_op", k))
    ops = [
        f"{k}={_backend_cell(d.kwargs[k], prefill_device if k == 'prefill_op' else generate_device, registry)}"
        for k in names
    ]
    return f"{d.operator} [{', '.join(ops)}]" if ops else d.operator


def format_plan(result: Plan, *, grouped: bool = True, registry: Registry | None = None) -> str:
    """The plan table plus a one-line summary; with `registry`, backends show their device notes."""
    if grouped:
        shown = group_decisions(result.decisions)
    else:
        shown = [{"template": d.module, "decision": d, "numbers": [()]} for d in result.decisions]
    rows = []
    for group in shown:
        d: Decision = group["decision"]
        rows.append([_group_name(group) or "(root)", d.module_class, "-" if d.rule is None else d.rule,
                     _operator_cell(d, registry), d.device])
    replaced = sum(1 for _ in result.replacements())
    return (
        format_table(["MODULE", "CLASS", "RULE", "OPERATOR", "DEVICE"], rows)
        + f"\n\n{len(result.decisions)} modules, {replaced} replaced by operators, {len(result.rules)} rules "
        f"({result.rules.source})"
    )
