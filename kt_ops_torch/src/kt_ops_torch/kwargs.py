"""Kwargs of the PyTorch backends (imported at registration, before any operator is used)."""

from __future__ import annotations

from pydantic import Field

from kt_core.operator_kwargs import BackendKwargs, DTypeName


class TorchBackendKwargs(BackendKwargs):
    dtype: DTypeName | None = Field(
        None, description="Dtype the weights are held and computed in; torch's default dtype when omitted."
    )
