"""Multi-device layer placement: the ``transfer_map`` of model operators.

A model operator (``KDeepseekV2Model``, ``KQwen2MoeModel``) runs its decoder layers in
order; ``transfer_map: {30: "cuda:1"}`` says that from layer 30 on, hidden states and
everything the layers need (position embeddings, mask, position ids) live on
``cuda:1``. The pieces here are shared by every model plugin.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field, field_validator

from kt_core.devices import Device
from kt_core.errors import KtUserError
from kt_core.operator_kwargs import OperatorKwargs


class TransferMapKwargs(OperatorKwargs):
    """Kwargs of a model operator with multi-device layer placement."""

    transfer_map: dict[int, Device] = Field(
        default_factory=dict,
        description="Layer index → device: from that layer on, activations move to that device.",
    )

    per_layer_prefill_intput_threshold: int = Field(
        0,
        description=(
            "Accepted for KTransformers rule files (spelled as they spell it): the prompt length from "
            "which KTransformers prefills layer by layer. kt has no layer-wise prefill, so only 0 "
            "(off, what KTransformers' own rule files set) is accepted."
        ),
    )

    @field_validator("transfer_map")
    @classmethod
    def _non_negative(cls, value: dict[int, str]) -> dict[int, str]:
        bad = [k for k in value if k < 0]
        if bad:
            raise ValueError(f"layer indices must be >= 0, got {bad}")
        return value

    @field_validator("per_layer_prefill_intput_threshold")
    @classmethod
    def _layer_wise_prefill_off(cls, value: int) -> int:
        # Accepting 0 lets KTransformers' files validate unchanged; any other value asks for
        # behaviour kt does not have, and silently ignoring it would mislead.
        if value != 0:
            raise ValueError(
                f"kt has no layer-wise prefill; only 0 (off) is accepted, got {value} "
                "(remove the key, or set it to 0)"
            )
        return value


def check_transfer_map(transfer_map: Mapping[int, str] | None, num_layers: int, owner: str) -> dict[int, str]:
    """`transfer_map` as ``{int layer: str device}``, refusing layers the model does not have.

    The kwargs schema can only check that indices are non-negative; the layer count is
    known once the operator sees the config, so a model operator calls this in its
    constructor and a rule file with a wrong index fails before any weight is read, not
    silently never moving. `owner` names the operator in the message
    (``"KDeepseekV2Model at model"``).
    """
    checked = {int(layer): str(device) for layer, device in (transfer_map or {}).items()}
    beyond = sorted(layer for layer in checked if layer >= num_layers)
    if beyond:
        raise KtUserError(
            f"{owner}: transfer_map names layer(s) {beyond}, but the model has {num_layers} layers (0–{num_layers - 1})"
        )
    return checked


def layer_devices(num_layers: int, transfer_map: dict[int, str], start_device: str) -> list[str]:
    """The device each layer's activations live on, given where layer 0 starts."""
    devices, current = [], start_device
    for index in range(num_layers):
        current = transfer_map.get(index, current)
        devices.append(current)
    return devices


def move_to(value: Any, device: torch.device | str) -> Any:
    """`value` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(move_to(v, device) for v in value)
    if isinstance(value, list):
        return [move_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: move_to(v, device) for k, v in value.items()}
    return value
