"""Diagnostics about rule files, printed the way compilers print them: ``FILE:LINE:COL: …``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from kt_core.errors import KtUserError, SourceLocation

Severity = Literal["error", "warning"]


@dataclass(frozen=True)
class Diagnostic:
    """One finding about a rule file, with the position it is about."""

    location: SourceLocation
    message: str
    severity: Severity = "error"
    rule: int | None = None

    def __str__(self) -> str:
        return f"{self.location}: {self.severity}: {self.message}"


class RuleFileError(KtUserError):
    """A rule file is invalid; carries every problem found, not just the first."""

    def __init__(self, diagnostics: Sequence[Diagnostic]) -> None:
        self.diagnostics = list(diagnostics)
        super().__init__("\n".join(str(d) for d in self.diagnostics))
