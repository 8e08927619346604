"""Which kernel path (instruction set) new engine objects use.

The engine picks the best path this CPU supports (AVX-512 with VNNI/BF16, else AVX2).
Forcing the baseline is useful to test it on an AVX-512 machine or to compare the two:
set ``KT_CPUINFER_ISA=avx2`` before starting, or call `set_isa` / `use_isa`. The choice is
read when a backend loads, so each layer keeps the path it was built with.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from kt_core.errors import KtUserError
from kt_ops_cpuinfer import _engine

ISA_ENV = "KT_CPUINFER_ISA"
"""Environment variable forcing a kernel path: ``auto`` (default), ``avx2`` or ``avx512``."""

_NAMES = ("auto", "avx2", "avx512")
_forced: str | None = None


class UnsupportedISAError(KtUserError):
    """The requested kernel path is unknown or this CPU cannot run it."""


def supported_isas() -> list[str]:
    """Kernel paths this CPU (and OS) can run, best first, e.g. ``["avx512", "avx2"]``."""
    return list(_engine.supported_isas())


def _resolve(name: str, origin: str) -> str:
    if name not in _NAMES:
        raise UnsupportedISAError(f"{origin}: unknown kernel path {name!r}; expected one of {', '.join(_NAMES)}")
    try:
        return str(_engine.resolve_isa(name))
    except RuntimeError as exc:
        raise UnsupportedISAError(f"{origin}: {exc}; this CPU supports: {', '.join(supported_isas()) or 'none'}") from exc


def set_isa(name: str | None) -> None:
    """Force the kernel path of engine objects created from now on; None returns to the
    environment variable's choice (or automatic selection)."""
    global _forced
    if name is not None:
        _resolve(name, "set_isa")
    _forced = name


def current_isa() -> str:
    """The kernel path new engine objects get: forced by `set_isa`, else ``$KT_CPUINFER_ISA``, else the best."""
    if _forced is not None:
        return _resolve(_forced, "set_isa")
    env = os.environ.get(ISA_ENV, "").strip().lower()
    if env:
        return _resolve(env, f"${ISA_ENV}")
    return _resolve("auto", "automatic selection")


@contextmanager
def use_isa(name: str) -> Iterator[str]:
    """Within the block, new engine objects use kernel path `name` (yielded, resolved)."""
    global _forced
    previous = _forced
    set_isa(name)
    try:
        yield current_isa()
    finally:
        _forced = previous
