"""`kt rules validate | schema | explain`: check rule files and show what they do, without weights."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from kt_core.cli.plan_view import format_plan
from kt_core.devices import DeviceMap
from kt_core.errors import KtUserError
from kt_core.inject import check_replacements
from kt_core.model_config import build_meta_model, resolve_config
from kt_core.planner import Plan, plan
from kt_core.plugins import get_registry
from kt_core.rules.diagnostics import RuleFileError
from kt_core.rules.json_schema import rules_json_schema
from kt_core.rules.loader import load_rules
from kt_core.rules.shipped import find_rule_file


def register(subparsers: argparse._SubParsersAction) -> None:
    rules = subparsers.add_parser("rules", help="validate, explain and export the schema of rule files")
    sub = rules.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    sub.required = True

    validate = sub.add_parser("validate", help="check rule files against the schema and the installed plugins")
    validate.add_argument("files", nargs="+", metavar="FILE", help="rule file path or shipped rule name")
    validate.add_argument("--model", help="also plan against this model (reports rules that match nothing)")
    validate.add_argument("--strict", action="store_true", help="treat warnings as errors")
    validate.add_argument("--device-map", action="append", default=[], metavar="FROM=TO")
    validate.set_defaults(handler=run_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of rule files for the installed plugins")
    schema.add_argument("-o", "--output", type=Path, help="write to this file instead of stdout")
    schema.set_defaults(handler=run_schema)

    explain = sub.add_parser("explain", help="show which rule decides each module, its operator and device")
    explain.add_argument("rules", metavar="RULES", help="rule file path or shipped rule name")
    explain.add_argument("--model", required=True, help="config directory or built-in model name")
    explain.add_argument("--device-map", action="append", default=[], metavar="FROM=TO",
                         help="remap a device, e.g. cuda:0=cpu (repeatable)")
    explain.add_argument("--json", action="store_true", help="print a JSON list, one object per module")
    explain.add_argument("--all", action="store_true", help="one row per module instead of grouping layers")
    explain.add_argument("--strict", action="store_true", help="treat warnings as errors")
    explain.set_defaults(handler=run_explain)


def _plan_for(rules_arg: str, model_arg: str, device_map: Sequence[str]) -> Plan:
    registry = get_registry()
    rule_set = load_rules(find_rule_file(rules_arg), registry)
    config = resolve_config(model_arg, registry)
    model = build_meta_model(config, registry)
    result = plan(model, rule_set, device_map=DeviceMap.parse(device_map))
    problems = check_replacements(model, result, registry)
    if problems:
        raise RuleFileError(problems)
    return result


def _print_warnings(result: Plan, strict: bool) -> None:
    if strict:
        result.raise_if_strict()
    for diagnostic in result.diagnostics:
        print(diagnostic, file=sys.stderr)


def run_validate(args: argparse.Namespace) -> int:
    registry = get_registry()
    errors: list[str] = []
    for name in args.files:
        try:
            if args.model:
                _print_warnings(_plan_for(name, args.model, args.device_map), args.strict)
            else:
                load_rules(find_rule_file(name), registry)
        except KtUserError as exc:  # a bad file (or a missing one) must not hide the others' results
            errors.append(str(exc))
            continue
        print(f"{name}: ok")
    if errors:
        print("\n".join(errors), file=sys.stderr)
        return 2
    return 0


def run_schema(args: argparse.Namespace) -> int:
    text = json.dumps(rules_json_schema(get_registry()), indent=2)
    if args.output is None:
        print(text)
    else:
        args.output.write_text(text + "\n", encoding="utf-8")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


def run_explain(args: argparse.Namespace) -> int:
    result = _plan_for(args.rules, args.model, args.device_map)
    if args.json:
        _print_warnings(result, args.strict)
        print(json.dumps([d.as_json() for d in result.decisions], indent=2, default=str))
        return 0
    print(format_plan(result, grouped=not args.all, registry=get_registry()))
    _print_warnings(result, args.strict)
    return 0
