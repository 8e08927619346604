"""The hooks a kt plugin implements.

Each hook receives a `register` callback instead of returning values (the style of
simonw/llm), so hook signatures never need to change when registration grows new
optional fields. A plugin implements any subset of them with `kt_core.hookimpl`.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

hookspec = pluggy.HookspecMarker("kt")
hookimpl = pluggy.HookimplMarker("kt")


@hookspec
def register_operators(register: Callable[..., None]) -> None:
    """Register operators: ``register(name=, target=, kind=, summary=, kwargs_model=, ...)``."""


@hookspec
def register_model_classes(register: Callable[..., None]) -> None:
    """Register module classes rules can match: ``register(name=, target=, aliases=...)``."""


@hookspec
def register_model_families(register: Callable[..., None]) -> None:
    """Register model families: ``register(ModelFamily(...))``."""
