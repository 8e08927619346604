"""Rule files: YAML with positions, the schema, validation against the registry, JSON Schema."""

from kt_core.rules.diagnostics import Diagnostic, RuleFileError
from kt_core.rules.loader import Rule, RuleSet, load_rules, parse_rules

__all__ = ["Diagnostic", "Rule", "RuleFileError", "RuleSet", "load_rules", "parse_rules"]
