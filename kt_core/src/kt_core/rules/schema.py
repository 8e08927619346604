"""The shape of a rule file, as pydantic models (structure only).

What names mean (operators, classes) and what kwargs an operator accepts depend on the
installed plugins; the loader checks those against the registry after this structural
pass. Keeping the two apart lets the structural schema stay static and simple.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, RootModel, field_validator, model_validator


class MatchSpec(BaseModel):
    """Which modules a rule applies to: a regex over the dotted path and/or a class."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(None, description="Regular expression searched in the module's dotted path.")
    class_: str | None = Field(None, alias="class", description="Registered module class; matches subclasses.")

    @field_validator("name")
    @classmethod
    def _regex_compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {value!r}: {exc}") from None
        return value

    @model_validator(mode="after")
    def _needs_a_criterion(self) -> MatchSpec:
        if self.name is None and self.class_ is None:
            raise ValueError("a match needs 'name', 'class' or both")
        return self


class ReplaceSpec(BaseModel):
    """What to do with matched modules: an operator (by registered name) or ``default``."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    class_: str = Field(alias="class", description="Registered operator name, or 'default' to keep the module.")
    kwargs: dict[str, Any] | None = Field(None, description="Operator kwargs (validated per operator).")


class RuleSpec(BaseModel):
    """One rule: the first rule (in file order) that matches a module decides it."""

    model_config = ConfigDict(extra="forbid")

    match: MatchSpec
    replace: ReplaceSpec
    recursive: bool = Field(True, description="Whether rules also apply to the submodules of a replaced module.")


class RuleFileSpec(RootModel[list[RuleSpec]]):
    """A rule file: a YAML list of rules."""
