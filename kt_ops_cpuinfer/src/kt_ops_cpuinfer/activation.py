"""The elementwise activation between the gate and up projections, from the model config."""

from __future__ import annotations

from typing import Any

from kt_core.errors import KtUserError
from kt_ops_cpuinfer import _engine


class UnsupportedActivationError(KtUserError):
    """The model's ``hidden_act`` is not one the engine implements."""


def activation_name(config: Any) -> str:
    """The config's ``hidden_act`` (``silu`` when absent), checked against the engine's activations
    (silu/swish, relu, gelu, gelu_pytorch_tanh/gelu_new/gelu_fast)."""
    act = str(getattr(config, "hidden_act", None) or "silu")
    try:
        _engine.check_activation(act)
    except ValueError as exc:
        raise UnsupportedActivationError(f"{exc}; use KExpertsTorch for this model's experts") from None
    return act
