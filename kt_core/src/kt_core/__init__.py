"""kt core: the rule schema, plugin registry, injection planner and operator contracts.

Plugins import what they need from here; kt-core itself never imports a plugin.

The names below are imported on first use (PEP 562), not when the package is: the `kt`
command must be able to set OpenMP's environment before anything loads torch (see
`kt_core.cli.openmp_env`), and every submodule of kt_core imports this package first.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kt_core.backends import BackendMemory, ExpertsBackend, HeadwiseLinearBackend, LinearBackend
    from kt_core.errors import KtUserError
    from kt_core.hookspecs import hookimpl
    from kt_core.injected import BaseInjectedModule
    from kt_core.operator_kwargs import BackendKwargs, OperatorKwargs
    from kt_core.registry import OperatorKind

_EXPORTS = {
    "BackendKwargs": "kt_core.operator_kwargs",
    "BackendMemory": "kt_core.backends",
    "BaseInjectedModule": "kt_core.injected",
    "ExpertsBackend": "kt_core.backends",
    "HeadwiseLinearBackend": "kt_core.backends",
    "KtUserError": "kt_core.errors",
    "LinearBackend": "kt_core.backends",
    "OperatorKind": "kt_core.registry",
    "OperatorKwargs": "kt_core.operator_kwargs",
    "hookimpl": "kt_core.hookspecs",
}

# A literal list, so linters and type checkers see what the TYPE_CHECKING imports re-export;
# tests/core/test_package_exports.py keeps it equal to _EXPORTS' keys.
__all__ = [
    "BackendKwargs",
    "BackendMemory",
    "BaseInjectedModule",
    "ExpertsBackend",
    "HeadwiseLinearBackend",
    "KtUserError",
    "LinearBackend",
    "OperatorKind",
    "OperatorKwargs",
    "hookimpl",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kt_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
