"""kt-core's own registrations: the dispatching wrappers and torch's module classes.

Registered through the same hooks as any plugin (and always loaded, whatever
``KT_PLUGINS`` says), so `kt plugins` shows them and the registry has one path for all
names.
"""

from __future__ import annotations

from collections.abc import Callable

from kt_core.hookspecs import hookimpl
from kt_core.operator_kwargs import ExpertsWrapperKwargs, LinearWrapperKwargs
from kt_core.registry import OperatorKind


@hookimpl
def register_operators(register: Callable[..., None]) -> None:
    register(
        name="KTransformersLinear",
        target="kt_core.operators.linear:KTransformersLinear",
        kind=OperatorKind.MODULE,
        summary="nn.Linear computed by a registered linear backend (generate_op / prefill_op)",
        kwargs_model=LinearWrapperKwargs,
        aliases=("ktransformers.operators.linear.KTransformersLinear",),
        dispatches_to=OperatorKind.LINEAR_BACKEND,
    )
    register(
        name="KTransformersExperts",
        target="kt_core.operators.experts:KTransformersExperts",
        kind=OperatorKind.MODULE,
        summary="routed experts computed by a registered experts backend (generate_op / prefill_op)",
        kwargs_model=ExpertsWrapperKwargs,
        aliases=("ktransformers.operators.experts.KTransformersExperts",),
        dispatches_to=OperatorKind.EXPERTS_BACKEND,
    )


@hookimpl
def register_model_classes(register: Callable[..., None]) -> None:
    register(name="torch.nn.Linear", target="torch.nn:Linear", aliases=("nn.Linear", "Linear"))
    register(name="torch.nn.Embedding", target="torch.nn:Embedding", aliases=("nn.Embedding", "Embedding"))
    register(name="torch.nn.ModuleList", target="torch.nn:ModuleList", aliases=("nn.ModuleList",))
