"""`kt gguf`: look inside GGUF files.

``kt gguf inspect FILE`` prints a GGUF file's (or split model's) architecture,
metadata, quantization mix and tensor table, or with ``--json`` the same as JSON for
scripts. A malformed file is reported as a user error naming what is wrong.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``gguf`` command and its subcommands to the top-level parser."""
    p = subparsers.add_parser("gguf", help="look inside GGUF files")
    commands = p.add_subparsers(dest="gguf_command", metavar="SUBCOMMAND")
    commands.required = True
    inspect = commands.add_parser(
        "inspect",
        help="show a GGUF file's metadata, quantization types and tensors",
        description="Show a GGUF file's metadata, quantization types and tensors. For a split model, "
        "pass any part (NAME-00001-of-0000N.gguf); all parts are read.",
    )
    inspect.add_argument("file", metavar="FILE", help="the .gguf file (for a split model, one of its parts)")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of tables")
    inspect.set_defaults(handler=run_inspect)


def run_inspect(args: argparse.Namespace) -> int:
    """Print the report for ``args.file``; a bad file raises `GGUFFormatError` (exit 2)."""
    from kt_core.weights.inspect import format_inspect, inspect_gguf

    report = inspect_gguf(args.file)
    if args.json:
        print(json.dumps(report, indent=2, ensure_ascii=False))
    else:
        print(format_inspect(report), end="")
    return 0
