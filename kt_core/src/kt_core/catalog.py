"""Names kt knows about even when the plugin providing them is not installed.

The registry holds only what installed plugins register. This catalog lets an error say
*"KExpertsCPU is provided by kt-ops-cpuinfer, which is not installed"* instead of a bare
"unknown operator", and explains KTransformers names that have no counterpart here.
It is data only: nothing in it is imported.
"""

from __future__ import annotations

_KT_OPS = "ktransformers.operators"
_KT_MODELS = "ktransformers.models"


def _with_kt_alias(provider: str, names: dict[str, str]) -> dict[str, str]:
    """Map each short name and its KTransformers dotted alias to `provider`."""
    out: dict[str, str] = {}
    for short, kt_module in names.items():
        out[short] = provider
        out[f"{_KT_OPS}.{kt_module}.{short}"] = provider
    return out


KNOWN_PROVIDERS: dict[str, str] = {
    **_with_kt_alias("kt-ops-torch", {"KLinearTorch": "linear", "KExpertsTorch": "experts", "RotaryEmbedding": "RoPE"}),
    **_with_kt_alias(
        "kt-ops-cpuinfer", {"KExpertsCPU": "experts", "KLinearCPUInfer": "linear"}
    ),
    **_with_kt_alias("kt-ops-marlin", {"KLinearMarlin": "linear", "KExpertsMarlin": "experts"}),
    **_with_kt_alias(
        "kt-models-deepseek",
        {
            "KDeepseekV2Attention": "attention",
            "KDeepseekV2MoE": "experts",
            "KDeepseekV3MoE": "experts",
            "KDeepseekV2Model": "models",
            "YarnRotaryEmbedding": "RoPE",
        },
    ),
    **_with_kt_alias(
        "kt-models-qwen",
        {"KQwen2MoeSparseMoeBlock": "experts", "KQwen3MoeSparseMoeBlock": "experts", "KQwen2MoeModel": "models"},
    ),
    "MLPCPUExperts": "kt-ops-cpuinfer",
    "MLPCUDAExperts": "kt-ops-marlin",
    "QuantizedLinearMarlin": "kt-ops-marlin",
    "DeepseekV2Moe": "kt-models-deepseek",
    "DeepseekV3MoE": "kt-models-deepseek",
    "Qwen2MoeSparseMoeBlock": "kt-models-qwen",
    "Qwen3MoeSparseMoeBlock": "kt-models-qwen",
    f"{_KT_OPS}.RoPE.YarnRotaryEmbeddingV3": "kt-models-deepseek",
    f"{_KT_OPS}.layer_wise_prefill.KQwen2MoeModel": "kt-models-qwen",
    f"{_KT_MODELS}.modeling_deepseek.DeepseekV2MoE": "kt-models-deepseek",
    f"{_KT_MODELS}.modeling_deepseek.DeepseekV2Attention": "kt-models-deepseek",
    f"{_KT_MODELS}.modeling_deepseek.DeepseekV2YarnRotaryEmbedding": "kt-models-deepseek",
    f"{_KT_MODELS}.modeling_deepseek_v3.DeepseekV3MoE": "kt-models-deepseek",
    f"{_KT_MODELS}.modeling_qwen2_moe.Qwen2MoeSparseMoeBlock": "kt-models-qwen",
    f"{_KT_MODELS}.modeling_qwen3_moe.Qwen3MoeSparseMoeBlock": "kt-models-qwen",
}
"""Operator and class names by the distribution that provides them."""


RETIRED_NAMES: dict[str, str] = {
    f"{_KT_OPS}.gate.KMoEGate": (
        "kt computes routing inside its MoE blocks (KDeepseekV2MoE, KDeepseekV3MoE, "
        "KQwen2MoeSparseMoeBlock); replace the MoE block instead and drop the gate rule"
    ),
    f"{_KT_OPS}.gate.KMoEGateDeepSeekV3": (
        "kt computes routing inside KDeepseekV3MoE; replace the MoE block instead and drop the gate rule"
    ),
    f"{_KT_OPS}.flashinfer_wrapper.MLAWrapperSingleton": (
        "kt has no flashinfer backend; KDeepseekV2Attention computes absorbed MLA in PyTorch"
    ),
    f"{_KT_OPS}.linear.KLinearFP8": "kt has no FP8 linear backend; use KLinearMarlin or KLinearTorch",
}
"""KTransformers names with no counterpart in kt, with what to do instead."""
