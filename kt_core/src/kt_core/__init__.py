"""kt core: the rule schema, plugin registry, injection planner and operator contracts.

Plugins import what they need from here; kt-core itself never imports a plugin.
"""

from kt_core.backends import BackendMemory, ExpertsBackend, LinearBackend
from kt_core.errors import KtUserError
from kt_core.hookspecs import hookimpl
from kt_core.injected import BaseInjectedModule
from kt_core.operator_kwargs import BackendKwargs, OperatorKwargs
from kt_core.registry import OperatorKind

__all__ = [
    "BackendKwargs",
    "BackendMemory",
    "BaseInjectedModule",
    "ExpertsBackend",
    "KtUserError",
    "LinearBackend",
    "OperatorKind",
    "OperatorKwargs",
    "hookimpl",
]
