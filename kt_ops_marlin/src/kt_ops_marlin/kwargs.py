"""Kwargs of the int4 backends (imported at registration, before any operator is used)."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, Field

from kt_core.operator_kwargs import BackendKwargs, DTypeName
from kt_ops_marlin.group_size import GROUP_SIZE_MULTIPLE, PER_CHANNEL, validate_group_size

GroupSize = Annotated[
    int,
    AfterValidator(validate_group_size),
    Field(
        json_schema_extra={
            "anyOf": [{"const": PER_CHANNEL}, {"minimum": GROUP_SIZE_MULTIPLE, "multipleOf": GROUP_SIZE_MULTIPLE}]
        }
    ),
]


class MarlinBackendKwargs(BackendKwargs):
    """Kwargs of `KLinearMarlin` and `KExpertsMarlin`."""

    group_size: GroupSize = Field(
        128,
        description=(
            "Number of consecutive input features sharing one int4 scale: a positive multiple of 32 "
            "that divides every in_features the rule covers, or -1 for one scale per output channel."
        ),
    )
    dtype: DTypeName | None = Field(
        None,
        description=(
            "Dtype of the scales and of the activations the int4 kernel multiplies; torch's default "
            "dtype (the model's) when omitted."
        ),
    )
