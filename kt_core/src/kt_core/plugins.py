"""Plugin discovery: entry points → pluggy → the registry.

Plugins are modules named by entry points in the ``kt`` group. Each is registered with
a pluggy manager under its distribution's name; then each hook implementation is called
*one at a time* with a `register` callback bound to that distribution, so every
registration records who made it and one plugin's failure cannot hide another's
registrations. A plugin that fails to import or register is recorded in
`Registry.failures` and reported, and the others keep working.

``KT_PLUGINS`` (comma-separated distribution names) limits which plugins load; kt-core's
own registrations always load.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import Any

import importlib_metadata
import pluggy

from kt_core import hookspecs
from kt_core.registry import ModelClassSpec, OperatorSpec, PluginFailure, Registry

ENTRY_POINT_GROUP = "kt"
ALLOW_ENV = "KT_PLUGINS"
CORE_DISTRIBUTION = "kt-core"


@dataclass(frozen=True)
class PluginInfo:
    """A loaded plugin: the distribution that provides it and its version."""

    distribution: str
    version: str
    entry_point: str


@dataclass(frozen=True)
class LoadedPlugins:
    registry: Registry
    plugins: tuple[PluginInfo, ...]


def allowed_plugins(env: dict[str, str] | None = None) -> frozenset[str] | None:
    """The distributions ``KT_PLUGINS`` allows, or None when every plugin may load."""
    value = (os.environ if env is None else env).get(ALLOW_ENV)
    if value is None:
        return None
    return frozenset(_normalize(v) for v in value.split(",") if v.strip())


def _normalize(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def load_plugins(
    entry_points: Iterable[importlib_metadata.EntryPoint] | None = None,
    *,
    allow: frozenset[str] | None = None,
    extra_plugins: Iterable[tuple[PluginInfo, ModuleType]] = (),
) -> LoadedPlugins:
    """Discover plugins and build a registry from their registrations.

    `entry_points` defaults to the installed ``kt`` entry points; tests pass fake ones.
    `extra_plugins` are registered as if discovered (for tests and embedding).
    """
    from kt_core import core_plugin

    pm = pluggy.PluginManager("kt")
    pm.add_hookspecs(hookspecs)
    registry = Registry()
    infos: list[PluginInfo] = []
    modules: list[tuple[PluginInfo, ModuleType]] = [
        (PluginInfo(CORE_DISTRIBUTION, _version(CORE_DISTRIBUTION), "kt_core.core_plugin"), core_plugin)
    ]
    eps = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP) if entry_points is None else entry_points
    for ep in sorted(eps, key=lambda e: e.name):
        dist = _normalize(ep.dist.name) if ep.dist is not None else _normalize(ep.name)
        if allow is not None and dist not in allow:
            continue
        info = PluginInfo(dist, ep.dist.version if ep.dist is not None else "", ep.value)
        try:
            module = ep.load()
        except Exception as exc:
            registry.failures.append(PluginFailure(dist, f"import of {ep.value} failed: {type(exc).__name__}: {exc}"))
            continue
        modules.append((info, module))
    modules.extend(extra_plugins)

    for info, module in modules:
        try:
            pm.register(module, name=info.distribution)
        except Exception as exc:
            registry.failures.append(PluginFailure(info.distribution, f"invalid plugin: {exc}"))
            continue
        infos.append(info)

    for info in infos:
        error = _register_plugin(pm, pm.get_plugin(info.distribution), info.distribution, registry)
        if error is not None:
            registry.failures.append(PluginFailure(info.distribution, error))
        else:
            registry.distributions[info.distribution] = info.version
    return LoadedPlugins(registry, tuple(infos))


def _register_plugin(pm: pluggy.PluginManager, plugin: Any, dist: str, registry: Registry) -> str | None:
    """Run one plugin's registration hooks into a staging registry, then merge it.

    Staging keeps a plugin that fails halfway from leaving half of its names behind.
    Returns an error string when the plugin's registrations are rejected.
    """
    staged = Registry()
    registrars: dict[str, Callable[..., None]] = {
        "register_operators": lambda **kw: staged.add_operator(OperatorSpec(distribution=dist, **kw)),
        "register_model_classes": lambda **kw: staged.add_model_class(ModelClassSpec(distribution=dist, **kw)),
        "register_model_families": lambda family: staged.add_family(_with_distribution(family, dist)),
    }
    for hook_name, register in registrars.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                impl.function(register=register)
            except Exception as exc:
                return f"{hook_name} raised {type(exc).__name__}: {exc}"
    try:
        registry.merge(staged)
    except ValueError as exc:
        return str(exc)
    return None


def _with_distribution(family: Any, dist: str) -> Any:
    from dataclasses import replace

    return replace(family, distribution=dist)


def _version(dist: str) -> str:
    try:
        return importlib_metadata.version(dist)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@lru_cache(maxsize=1)
def _default() -> LoadedPlugins:
    return load_plugins(allow=allowed_plugins())


def get_registry() -> Registry:
    """The process-wide registry of installed (and allowed) plugins, built once."""
    return _default().registry


def get_plugins() -> tuple[PluginInfo, ...]:
    return _default().plugins


def reset() -> None:
    """Forget the cached registry (tests change the environment between calls)."""
    _default.cache_clear()
