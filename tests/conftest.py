"""Shared fixtures: the registry of installed plugins, and rule text helpers."""

from __future__ import annotations

import textwrap

import pytest

from kt_core.plugins import get_registry
from kt_core.registry import Registry
from kt_core.rules import RuleSet, parse_rules


@pytest.fixture(scope="session")
def registry() -> Registry:
    return get_registry()


@pytest.fixture
def rules_from(registry):
    """Parse dedented YAML rule text against the installed registry."""

    def parse(text: str, filename: str = "rules.yaml") -> RuleSet:
        return parse_rules(textwrap.dedent(text), registry, filename)

    return parse
