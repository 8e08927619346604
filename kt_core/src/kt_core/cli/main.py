"""Entry point of the `kt` command: subcommands, and the user-error/internal-error split.

A `KtUserError` (bad rule file, missing model, corrupt GGUF…) prints ``kt: error: …`` and
exits 2 without a traceback; anything else is a bug and keeps its traceback. Importing
this module does not import torch, so `main` can set OpenMP's environment first.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kt_core.cli.openmp_env import prefer_passive_openmp
from kt_core.errors import KtUserError

USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    from kt_core.cli import convert_cmd, demo_cmd, gguf_cmd, plugins_cmd, rules_cmd, run_cmd

    parser = argparse.ArgumentParser(
        prog="kt",
        description="Run Mixture-of-Experts models with operators injected by YAML rules.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module in (demo_cmd, plugins_cmd, rules_cmd, gguf_cmd, convert_cmd, run_cmd):
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    prefer_passive_openmp()  # before build_parser imports the commands, and with them torch
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KtUserError as exc:
        print(f"kt: error: {exc}", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("kt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
