"""Exception types that separate the user's mistakes from ours.

`KtUserError` and its subclasses are problems with what the user gave us (a rule file, a
model path, a GGUF file): the CLI prints their message and exits with status 2, without
a traceback. Anything else is a bug in kt or a plugin and keeps its traceback.
"""

from __future__ import annotations

from dataclasses import dataclass


class KtUserError(Exception):
    """A problem with the user's input; its message says what is wrong and what to do."""


@dataclass(frozen=True)
class SourceLocation:
    """A position in a user's file, 1-based, as editors and compilers print it."""

    file: str
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [self.file]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)
