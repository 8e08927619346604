"""Kwargs of the PyTorch backends (imported at registration, before any operator is used)."""

from __future__ import annotations

from pydantic import Field

from kt_core.operator_kwargs import BackendKwargs, DTypeName, OperatorKwargs


class TorchBackendKwargs(BackendKwargs):
    dtype: DTypeName | None = Field(
        None, description="Dtype the weights are held and computed in; torch's default dtype when omitted."
    )


class RotaryEmbeddingKwargs(OperatorKwargs):
    """Kwargs of `RotaryEmbedding`: only where it runs (its tables come from the model config)."""


class RMSNormKwargs(OperatorKwargs):
    """Kwargs of `RMSNorm`: only where it runs (its weight is held in the model's dtype)."""
