"""Kwargs of the DeepSeek operators (imported at registration, before any operator is used).

The defaults here are the operators' constructor defaults: a rule passes only the kwargs
it sets. The model operators take kt-core's `TransferMapKwargs` as they are.
"""

from __future__ import annotations

from pydantic import Field, PositiveInt

from kt_core.operator_kwargs import DTypeName, OperatorKwargs

DEFAULT_MLA_PREFILL_THRESHOLD = 128
"""Query tokens from which MLA expands keys/values instead of absorbing (see the field)."""


class MLAAttentionKwargs(OperatorKwargs):
    """Kwargs of KDeepseekV2Attention (absorbed multi-head latent attention)."""

    absorb_for_prefill: bool = Field(
        False,
        description=(
            "Use the absorbed form for every call, also long prefills. When false, calls with at "
            "least prefill_threshold query tokens expand kv_b_proj over the keys instead."
        ),
    )
    prefill_threshold: PositiveInt = Field(
        DEFAULT_MLA_PREFILL_THRESHOLD,
        description=(
            "Number of query tokens in one call from which the non-absorbed form is used (unless "
            "absorb_for_prefill). Absorbing costs ~(2·kv_lora_rank + rope_dim) per query·key·head, "
            "expanding ~(nope + rope + v) plus a one-off expansion of every key; for DeepSeek's "
            "sizes expanding wins from roughly 150 queries on."
        ),
    )
    dtype: DTypeName | None = Field(
        None,
        description=(
            "Dtype of the absorbed kv_b_proj weights and their matmuls. When omitted: float32 on the "
            "CPU (torch's bfloat16 batched matmuls with one query row are ~10x slower there), "
            "torch's default dtype on other devices; with absorb_op (the halves then serve only "
            "the expanded form of long prefills) the model's dtype where torch multiplies it at least as "
            "fast as float32 (bfloat16: AMX-BF16), else float32 (bfloat16 ~13x slower without "
            "bfloat16 dot products, 1.5-2x with AVX512-BF16 alone)."
        ),
    )
    absorb_op: str | None = Field(
        None,
        description=(
            "A registered per-head backend (kind headwise-backend) for the absorbed products with "
            "W_UK and W_UV, e.g. KHeadwiseLinearCPUInfer: the CPU engine on the GGUF's stored "
            "attn_k_b/attn_v_b blocks, with the attention core between them when the backend offers "
            "one. When omitted, torch's batched matmuls on float copies of kv_b_proj's halves. With "
            "absorb_for_prefill the float copies are not loaded at all (less memory, slower long "
            "prompts: the expanded form's large matmuls beat the absorbed form there)."
        ),
    )


class DeepseekMoEKwargs(OperatorKwargs):
    """Kwargs of KDeepseekV2MoE / KDeepseekV3MoE: only placement (routing comes from the config)."""


class RotaryKwargs(OperatorKwargs):
    """Kwargs of YarnRotaryEmbedding: only placement (the rope type comes from the config)."""
