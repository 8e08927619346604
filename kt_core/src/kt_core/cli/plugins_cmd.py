"""`kt plugins`: what is installed, which versions, and what each plugin registers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from kt_core.cli.table import format_table
from kt_core.plugins import get_plugins, get_registry


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("plugins", help="list installed plugins and what they register")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=run)


def plugins_report() -> list[dict[str, Any]]:
    """One entry per loaded or failed plugin, with its registrations."""
    registry = get_registry()
    report = []
    for info in get_plugins():
        dist = info.distribution
        report.append(
            {
                "distribution": dist,
                "version": info.version,
                "entry_point": info.entry_point,
                "operators": [
                    {
                        "name": s.name,
                        "kind": str(s.kind),
                        "devices": list(s.devices),
                        "aliases": list(s.aliases),
                        "summary": s.summary,
                    }
                    for s in registry.operators.values()
                    if s.distribution == dist
                ],
                "model_classes": [
                    {"name": c.name, "aliases": list(c.aliases)} for c in registry.model_classes.values() if c.distribution == dist
                ],
                "model_families": [
                    {"name": f.name, "model_types": list(f.hf_model_types), "gguf_architectures": list(f.gguf_architectures),
                     "builtin_configs": sorted(f.builtin_configs)}
                    for f in registry.families.values()
                    if f.distribution == dist
                ],
                "error": next((f.error for f in registry.failures if f.plugin == dist), None),
            }
        )
    known = {r["distribution"] for r in report}
    for failure in registry.failures:
        if failure.plugin not in known:
            report.append({"distribution": failure.plugin, "version": None, "entry_point": None, "operators": [],
                           "model_classes": [], "model_families": [], "error": failure.error})
    return report


def run(args: argparse.Namespace) -> int:
    report = plugins_report()
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(format_table(
        ["DISTRIBUTION", "VERSION", "OPERATORS", "CLASSES", "FAMILIES", "STATUS"],
        [
            [r["distribution"], r["version"] or "-", len(r["operators"]), len(r["model_classes"]),
             ", ".join(f["name"] for f in r["model_families"]) or "-", "FAILED" if r["error"] else "ok"]
            for r in report
        ],
    ))
    ops = [(s["name"], s["kind"], ",".join(s["devices"]), r["distribution"], s["summary"])
           for r in report for s in r["operators"]]
    if ops:
        print()
        print(format_table(["OPERATOR", "KIND", "DEVICES", "PROVIDED BY", "SUMMARY"], sorted(ops)))
    # Rules match on these names (match.class); the aliases are how KTransformers files spell them.
    classes = [(c["name"], r["distribution"], ", ".join(c["aliases"]) or "-")
               for r in report for c in r["model_classes"]]
    if classes:
        print()
        print(format_table(["MODEL CLASS", "PROVIDED BY", "ALIASES"], sorted(classes)))
    for r in report:
        if r["error"]:
            print(f"\n{r['distribution']} failed to load: {r['error']}")
    return 0
