"""Rule files shipped with kt, usable by name (``--rules deepseek-v2-lite-cpu``)."""

from __future__ import annotations

import difflib
from pathlib import Path

from kt_core.errors import KtUserError

SHIPPED_DIR = Path(__file__).resolve().parent.parent / "shipped_rules"


def shipped_rule_files() -> dict[str, Path]:
    """Shipped rule files by name (file name without ``.yaml``)."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.yaml"))}


def find_rule_file(name_or_path: str) -> Path:
    """A rule file given as a path, or as the name of a shipped rule file."""
    path = Path(name_or_path)
    if path.exists():
        return path
    shipped = shipped_rule_files()
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    if stem in shipped and len(path.parts) == 1:
        return shipped[stem]
    message = f"rule file {name_or_path!r} not found"
    close = difflib.get_close_matches(stem, list(shipped), n=1, cutoff=0.5)
    if close:
        message += f"; did you mean the shipped {close[0]!r}?"
    if shipped:
        message += f" (shipped rule files: {', '.join(shipped)})"
    raise KtUserError(message)
