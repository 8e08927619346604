"""Transformers ⇄ GGUF tensor names for Qwen2-MoE (``qwen2moe``) and Qwen3-MoE (``qwen3moe``).

The table follows what llama.cpp's ``convert_hf_to_gguf.py`` writes for
``Qwen2MoeForCausalLM`` / ``Qwen3MoeForCausalLM`` and what ``llama-model.cpp`` loads. All
shapes are PyTorch order (outermost first), the reverse of GGML's ``ne``.

- Qwen2-MoE has q/k/v biases (``attn_q.bias``…), a shared expert (``ffn_*_shexp``) and
  its sigmoid gate ``shared_expert_gate`` [1, H] → ``ffn_gate_inp_shexp``. The current
  converter writes that gate as [1, H]; older ones squeezed it to [H], so reading reshapes
  whatever the file holds back to [1, H].
- Qwen3-MoE has per-head q/k RMSNorms (``attn_q_norm`` / ``attn_k_norm`` [head_dim]) and no
  shared expert.

Rotary embeddings: llama.cpp runs both architectures with ``LLAMA_ROPE_TYPE_NEOX``
(rotation of ``x[i]`` with ``x[i + d/2]``), the converter does not permute q/k for Qwen,
and transformers' Qwen models rotate the same halves (``rotate_half``). So q/k map 1:1.

Experts have two transformers spellings (see `kt_core.weights.name_map`): the fused
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) and the split stacked virtual
names in `VIRTUAL_EXPERT_NAMES`; both map onto ``ffn_gate_exps`` / ``ffn_up_exps``
[E, I, H]. Layers a config makes dense (``mlp_only_layers``, ``decoder_sparse_step``) map
to ``ffn_gate`` / ``ffn_up`` / ``ffn_down``; no released model has them and llama.cpp's
graphs cannot run them, so `gguf_metadata` refuses to write such a config.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from kt_core.weights.name_map import (
    VIRTUAL_EXPERT_NAMES,
    NameMap,
    TensorMapping,
    embedding_and_head_mappings,
    gated_mlp_mappings,
    same_tensor,
    stacked_expert_mappings,
)


def name_map(config: PretrainedConfig, gguf_tensor_names: frozenset[str] | None) -> NameMap:
    """The name map of one Qwen2-MoE or Qwen3-MoE model.

    `gguf_tensor_names` only matters for the output head: a file without ``output.weight``
    (tied embeddings) is read through ``token_embd.weight``, as llama.cpp does.
    """
    m = NameMap()
    for mapping in embedding_and_head_mappings(config, gguf_tensor_names):
        m.add(mapping)
    for i in range(config.num_hidden_layers):
        for mapping in _attention(config, i) + _mlp(config, i):
            m.add(mapping)
    return m


def is_sparse_layer(config: PretrainedConfig, i: int) -> bool:
    """Whether layer `i` has experts, by the rule the transformers Qwen-MoE decoder layer uses."""
    step = getattr(config, "decoder_sparse_step", 1) or 1
    return i not in (config.mlp_only_layers or []) and config.num_experts > 0 and (i + 1) % step == 0


def _attention(config: PretrainedConfig, i: int) -> list[TensorMapping]:
    hf = f"model.layers.{i}"
    blk = f"blk.{i}"
    attn = f"{hf}.self_attn"
    out = [
        same_tensor(f"{hf}.input_layernorm.weight", f"{blk}.attn_norm.weight", keep_f32=True),
        same_tensor(f"{hf}.post_attention_layernorm.weight", f"{blk}.ffn_norm.weight", keep_f32=True),
        same_tensor(f"{attn}.q_proj.weight", f"{blk}.attn_q.weight"),
        same_tensor(f"{attn}.k_proj.weight", f"{blk}.attn_k.weight"),
        same_tensor(f"{attn}.v_proj.weight", f"{blk}.attn_v.weight"),
        same_tensor(f"{attn}.o_proj.weight", f"{blk}.attn_output.weight"),
    ]
    if config.model_type == "qwen2_moe":
        if getattr(config, "qkv_bias", True):
            out += [
                same_tensor(f"{attn}.{p}_proj.bias", f"{blk}.attn_{p}.bias", keep_f32=True) for p in ("q", "k", "v")
            ]
    else:
        out += [
            same_tensor(f"{attn}.q_norm.weight", f"{blk}.attn_q_norm.weight", keep_f32=True),
            same_tensor(f"{attn}.k_norm.weight", f"{blk}.attn_k_norm.weight", keep_f32=True),
        ]
        if getattr(config, "attention_bias", False):
            out += [
                same_tensor(f"{attn}.{p}_proj.bias", f"{blk}.attn_{g}.bias", keep_f32=True)
                for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
            ]
    return out


def _mlp(config: PretrainedConfig, i: int) -> list[TensorMapping]:
    mlp = f"model.layers.{i}.mlp"
    blk = f"blk.{i}"
    if not is_sparse_layer(config, i):
        return gated_mlp_mappings(mlp, blk)
    out = [same_tensor(f"{mlp}.gate.weight", f"{blk}.ffn_gate_inp.weight", keep_f32=True)]
    out += stacked_expert_mappings(mlp, blk)
    if config.model_type == "qwen2_moe":
        out += gated_mlp_mappings(f"{mlp}.shared_expert", blk, "_shexp")
        out.append(
            TensorMapping(
                f"{mlp}.shared_expert_gate.weight",
                (f"{blk}.ffn_gate_inp_shexp.weight",),
                to_hf=_as_row,
                keep_f32=True,
            )
        )
    return out


def _as_row(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    (gate,) = parts
    return gate.reshape(1, -1)


__all__ = ["VIRTUAL_EXPERT_NAMES", "is_sparse_layer", "name_map"]
