"""Pydantic models of the kwargs rules pass to operators.

Every operator declares its kwargs as a model derived from these, so a typo in a rule
file (``generate_devce``) or a wrong type is caught when the file is validated, and the
exported JSON Schema tells editors what each operator accepts.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt

from kt_core.devices import Device

DTypeName = Literal["float32", "float16", "bfloat16"]


class OperatorKwargs(BaseModel):
    """Kwargs every module-replacing operator accepts: where it runs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    generate_device: Device | None = Field(
        None, description="Device for decoding; inherited from the nearest placed ancestor when omitted."
    )
    prefill_device: Device | None = Field(
        None, description="Device for prefill; the generate device when omitted."
    )


class DefaultKwargs(OperatorKwargs):
    """Kwargs of ``replace.class: default``: keep the module, only place it."""


class BackendKwargs(BaseModel):
    """Kwargs of a backend (passed through its wrapper); devices come from the wrapper."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DispatchKwargs(OperatorKwargs):
    """Kwargs of the dispatching wrappers: which backend decodes and which prefills.

    Keys not declared here are backend kwargs: they are validated against the kwargs
    models of the chosen backends and passed to those that declare them.
    """

    model_config = ConfigDict(extra="allow", frozen=True)

    generate_op: str = Field(description="Registered backend used below prefill_threshold tokens.")
    prefill_op: str | None = Field(
        None, description="Registered backend used at or above prefill_threshold tokens; generate_op when omitted."
    )
    prefill_threshold: PositiveInt = Field(
        32,
        description=(
            "Number of tokens in one forward call at which the prefill backend takes over. "
            "Decode steps (one token per sequence) always use generate_op."
        ),
    )


class LinearWrapperKwargs(DispatchKwargs):
    generate_op: str = Field("KLinearTorch", description="Registered linear backend used for decoding.")


class ExpertsWrapperKwargs(DispatchKwargs):
    generate_op: str = Field("KExpertsTorch", description="Registered experts backend used for decoding.")
    out_device: Device | None = Field(
        None, description="Device the experts' output is returned on; the input's device when omitted."
    )
