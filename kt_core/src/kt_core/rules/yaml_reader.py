"""Reading YAML so that every key and item keeps its line and column.

ruamel.yaml's round-trip loader records positions on every mapping and sequence; we
keep the loaded tree and look positions up when a diagnostic needs one, rather than
copying them into a parallel structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from kt_core.errors import SourceLocation
from kt_core.rules.diagnostics import Diagnostic, RuleFileError


def read_yaml(text: str, filename: str) -> Any:
    """Parse `text`; a syntax error becomes a `RuleFileError` at the offending position."""
    yaml = YAML(typ="rt")
    try:
        return yaml.load(text)
    except MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        loc = SourceLocation(filename, mark.line + 1, mark.column + 1) if mark else SourceLocation(filename)
        problem = exc.problem or "invalid YAML"
        context = f" ({exc.context})" if exc.context else ""
        raise RuleFileError([Diagnostic(loc, f"YAML syntax error: {problem}{context}")]) from None
    except YAMLError as exc:
        raise RuleFileError([Diagnostic(SourceLocation(filename), f"YAML error: {exc}")]) from None


def read_yaml_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RuleFileError([Diagnostic(SourceLocation(str(path)), "rule file not found")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RuleFileError([Diagnostic(SourceLocation(str(path)), f"cannot read rule file: {exc}")]) from None
    return read_yaml(text, str(path))


def locate(root: Any, path: Sequence[str | int], filename: str, *, at_key: bool = False) -> SourceLocation:
    """The position of the node at `path` in a tree loaded by `read_yaml`.

    With `at_key`, a mapping entry's position is its key's (where an unknown key should be
    reported); otherwise its value's. A path that leaves the tree (a missing key) stops at
    the deepest node that exists.
    """
    node = root
    line, col = (0, 0)
    for i, part in enumerate(path):
        last = i == len(path) - 1
        if isinstance(node, CommentedMap) and part in node:
            key_line, key_col, value_line, value_col = node.lc.data[part]
            line, col = (key_line, key_col) if (last and at_key) else (value_line, value_col)
            node = node[part]
        elif isinstance(node, CommentedSeq) and isinstance(part, int) and 0 <= part < len(node):
            line, col = node.lc.data[part]
            node = node[part]
        else:
            if isinstance(node, (CommentedMap, CommentedSeq)) and i == 0:
                line, col = node.lc.line, node.lc.col
            break
    return SourceLocation(filename, line + 1, col + 1)
