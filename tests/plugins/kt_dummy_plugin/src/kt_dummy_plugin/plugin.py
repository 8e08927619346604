"""Registers a module operator, a linear and an experts backend, as a third-party author would."""

from __future__ import annotations

from collections.abc import Callable

from pydantic import Field

from kt_core import BackendKwargs, OperatorKind, OperatorKwargs, hookimpl


class ScaledKwargs(OperatorKwargs):
    factor: float = Field(description="Multiplies the wrapped module's output.")


class OffsetKwargs(BackendKwargs):
    offset: float = Field(0.0, description="Added to every output element.")


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="DummyScaledModule",
        target="kt_dummy_plugin.ops:DummyScaledModule",
        kind=OperatorKind.MODULE,
        summary="runs the original module and scales its output (test plugin)",
        kwargs_model=ScaledKwargs,
        devices=("cpu",),
        aliases=("thirdparty.ops.Scaled",),
    )
    register(
        name="KLinearDummyOffset",
        target="kt_dummy_plugin.ops:KLinearDummyOffset",
        kind=OperatorKind.LINEAR_BACKEND,
        summary="float linear plus a constant offset (test plugin)",
        kwargs_model=OffsetKwargs,
        devices=("cpu",),
    )
    register(
        name="KExpertsDummyOffset",
        target="kt_dummy_plugin.ops:KExpertsDummyOffset",
        kind=OperatorKind.EXPERTS_BACKEND,
        summary="routed experts by a plain loop plus a constant offset (test plugin)",
        kwargs_model=OffsetKwargs,
        devices=("cpu",),
    )
