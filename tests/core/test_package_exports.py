"""kt_core's lazily imported top-level names: the literal ``__all__`` and the import table agree."""

from __future__ import annotations

import importlib

import kt_core


def test_all_lists_exactly_the_lazily_exported_names() -> None:
    assert kt_core.__all__ == sorted(kt_core._EXPORTS)


def test_every_exported_name_resolves_to_its_module_attribute() -> None:
    for name, module in kt_core._EXPORTS.items():
        assert getattr(kt_core, name) is getattr(importlib.import_module(module), name)
