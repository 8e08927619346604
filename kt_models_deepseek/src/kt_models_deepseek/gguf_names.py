"""Transformers ⇄ GGUF tensor names for DeepSeek-V2 / V2-Lite / V3 (GGUF architecture ``deepseek2``).

The table follows what llama.cpp's ``convert_hf_to_gguf.py`` writes for
``DeepseekV2ForCausalLM`` / ``DeepseekV3ForCausalLM`` and what ``llama-model.cpp`` loads.
All shapes below are PyTorch order (outermost first), the reverse of GGML's ``ne``.

MLA's ``kv_b_proj`` exists in two GGUF forms, and `name_map` picks per layer from the
file's tensor names:

- legacy files (converted before llama.cpp's MLA-absorption change) store it unchanged as
  ``blk.N.attn_kv_b.weight`` [H·(nope+v), kv_lora];
- current files store it split per head: ``attn_k_b`` [H, kv_lora, nope] (the key half of
  each head, *transposed*) and ``attn_v_b`` [H, v, kv_lora]. The current converter writes
  only these two, not ``attn_kv_b``, so that is also the form used for writing
  (``gguf_tensor_names=None``). A file holding both forms is read through ``attn_kv_b``.
  When reading a split file, the halves are also readable as stored under
  ``self_attn.kv_b_proj.k_b`` and ``self_attn.kv_b_proj.v_b`` (names kt adds beside the
  module's own weight), so a per-head backend computes on their blocks directly.

Rotary embeddings: llama.cpp runs ``deepseek2`` with ``LLAMA_ROPE_TYPE_NORM`` (rotation of
adjacent pairs ``(x[2i], x[2i+1])``) and the converter does not permute the q/k rope
weights. transformers' DeepseekV2 rotates the same adjacent pairs (complex view) and
DeepseekV3 with ``rope_interleave=True`` (the default, and what `config_from_gguf`
builds) rotates them too, only emitting the rotated values de-interleaved in both q and
k, which leaves every q·k product unchanged. So the weights map 1:1 and no permutation is
needed. Only a DeepseekV3 config with ``rope_interleave=False`` (weights whose rope rows
are already laid out half-and-half) needs one: for it the rope rows of ``q_proj`` /
``q_b_proj`` (per head) and of ``kv_a_proj_with_mqa`` are re-interleaved on the way to
GGUF and de-interleaved on the way back, so its GGUF runs correctly in llama.cpp and in a
model built by `config_from_gguf`.

Experts have two transformers spellings (see `kt_core.weights.name_map`): the fused
``mlp.experts.gate_up_proj`` [E, 2I, H] (gate rows first) of the transformers 5 module, and
the split stacked virtual names in `VIRTUAL_EXPERT_NAMES` that kt's expert backends load;
both map onto ``ffn_gate_exps`` / ``ffn_up_exps`` [E, I, H].
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PretrainedConfig

from kt_core.errors import KtUserError
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
    """The name map of one DeepSeek model; `gguf_tensor_names` selects the kv_b form (None: writing)."""
    names = gguf_tensor_names
    m = NameMap()
    for mapping in embedding_and_head_mappings(config, names):
        m.add(mapping)
    rope_rows = _RopeRows.for_config(config)
    for i in range(config.num_hidden_layers):
        for mapping in _attention(config, i, names, rope_rows):
            m.add(mapping)
        for mapping in _mlp(config, i):
            m.add(mapping)
    return m


# -- attention ------------------------------------------------------------------------


def _attention(
    config: PretrainedConfig, i: int, names: frozenset[str] | None, rope_rows: _RopeRows | None
) -> list[TensorMapping]:
    hf = f"model.layers.{i}"
    blk = f"blk.{i}"
    attn = f"{hf}.self_attn"
    out = [
        same_tensor(f"{hf}.input_layernorm.weight", f"{blk}.attn_norm.weight", keep_f32=True),
        same_tensor(f"{hf}.post_attention_layernorm.weight", f"{blk}.ffn_norm.weight", keep_f32=True),
        same_tensor(f"{attn}.kv_a_layernorm.weight", f"{blk}.attn_kv_a_norm.weight", keep_f32=True),
        same_tensor(f"{attn}.o_proj.weight", f"{blk}.attn_output.weight"),
    ]
    q_heads = config.num_attention_heads
    q_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    kv_a_dim = config.kv_lora_rank + config.qk_rope_head_dim
    if config.q_lora_rank is None:
        out.append(_rope_permuted(f"{attn}.q_proj.weight", f"{blk}.attn_q.weight", rope_rows, q_heads, q_head_dim))
    else:
        out += [
            same_tensor(f"{attn}.q_a_proj.weight", f"{blk}.attn_q_a.weight"),
            same_tensor(f"{attn}.q_a_layernorm.weight", f"{blk}.attn_q_a_norm.weight", keep_f32=True),
            _rope_permuted(f"{attn}.q_b_proj.weight", f"{blk}.attn_q_b.weight", rope_rows, q_heads, q_head_dim),
        ]
    out.append(
        _rope_permuted(f"{attn}.kv_a_proj_with_mqa.weight", f"{blk}.attn_kv_a_mqa.weight", rope_rows, 1, kv_a_dim)
    )
    if getattr(config, "attention_bias", False):
        # DeepSeek checkpoints have none; llama.cpp would ignore them, kt keeps them loadable.
        out.append(same_tensor(f"{attn}.o_proj.bias", f"{blk}.attn_output.bias", keep_f32=True))
        kv_a_bias = (f"{attn}.kv_a_proj_with_mqa.bias", f"{blk}.attn_kv_a_mqa.bias")
        out.append(_rope_permuted(*kv_a_bias, rope_rows, 1, kv_a_dim, keep_f32=True))
        if config.q_lora_rank is not None:
            out.append(same_tensor(f"{attn}.q_a_proj.bias", f"{blk}.attn_q_a.bias", keep_f32=True))
    out += _kv_b(config, i, names)
    return out


def _kv_b(config: PretrainedConfig, i: int, names: frozenset[str] | None) -> list[TensorMapping]:
    """``kv_b_proj`` from the legacy ``attn_kv_b`` or from the split ``attn_k_b`` + ``attn_v_b``.

    Reading a split file adds the stored halves under their own names (``kv_b_proj.k_b``
    [H, kv_lora, nope], ``kv_b_proj.v_b`` [H, v, kv_lora]); writing never does, since each
    GGUF tensor must be written once.
    """
    hf_name = f"model.layers.{i}.self_attn.kv_b_proj.weight"
    legacy = f"blk.{i}.attn_kv_b.weight"
    if names is not None and legacy in names:
        return [same_tensor(hf_name, legacy)]
    k_b, v_b = f"blk.{i}.attn_k_b.weight", f"blk.{i}.attn_v_b.weight"
    heads, nope, v_dim, rank = (
        config.num_attention_heads,
        config.qk_nope_head_dim,
        config.v_head_dim,
        config.kv_lora_rank,
    )

    def to_hf(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        k, v = parts
        if tuple(k.shape) != (heads, rank, nope) or tuple(v.shape) != (heads, v_dim, rank):
            raise KtUserError(
                f"GGUF tensors {k_b!r} {tuple(k.shape)} and {v_b!r} {tuple(v.shape)} do not have the shapes "
                f"({heads}, {rank}, {nope}) and ({heads}, {v_dim}, {rank}) that the model's config expects "
                "(num_attention_heads, kv_lora_rank, qk_nope_head_dim, v_head_dim); the file and config disagree"
            )
        return torch.cat([k.transpose(1, 2), v], dim=1).reshape(heads * (nope + v_dim), rank)

    def to_gguf(kv_b: torch.Tensor) -> list[torch.Tensor]:
        per_head = kv_b.reshape(heads, nope + v_dim, rank)
        return [per_head[:, :nope].transpose(1, 2).contiguous(), per_head[:, nope:].contiguous()]

    fused = TensorMapping(hf_name, (k_b, v_b), to_hf=to_hf, to_gguf=to_gguf)
    if names is None:
        return [fused]
    halves = hf_name.removesuffix(".weight")
    return [fused, same_tensor(f"{halves}.k_b", k_b), same_tensor(f"{halves}.v_b", v_b)]


class _RopeRows:
    """The row order that turns half-and-half rope rows into llama.cpp's adjacent pairs.

    Built only for a DeepseekV3 config with ``rope_interleave=False``; see the module
    docstring. Within each head's last `rope_dim` rows, GGUF row ``2j`` is HF row ``j``
    and GGUF row ``2j+1`` is HF row ``j + rope_dim/2``.
    """

    def __init__(self, rope_dim: int) -> None:
        self.rope_dim = rope_dim

    @classmethod
    def for_config(cls, config: PretrainedConfig) -> _RopeRows | None:
        if getattr(config, "rope_interleave", True):
            return None
        return cls(config.qk_rope_head_dim)

    def gguf_order(self, heads: int, head_dim: int) -> torch.Tensor:
        """Index such that ``gguf = hf[index]`` along the rows."""
        half = self.rope_dim // 2
        rope = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).reshape(-1)
        per_head = torch.cat([torch.arange(head_dim - self.rope_dim), head_dim - self.rope_dim + rope])
        return (torch.arange(heads)[:, None] * head_dim + per_head[None, :]).reshape(-1)


def _rope_permuted(
    hf_name: str,
    gguf_name: str,
    rope_rows: _RopeRows | None,
    heads: int,
    head_dim: int,
    *,
    keep_f32: bool = False,
) -> TensorMapping:
    if rope_rows is None:
        return same_tensor(hf_name, gguf_name, keep_f32=keep_f32)
    order = rope_rows.gguf_order(heads, head_dim)
    inverse = torch.argsort(order)

    def to_hf(parts: Sequence[torch.Tensor]) -> torch.Tensor:
        (t,) = parts
        return t.index_select(0, inverse.to(t.device))

    def to_gguf(t: torch.Tensor) -> list[torch.Tensor]:
        return [t.index_select(0, order.to(t.device))]

    return TensorMapping(hf_name, (gguf_name,), to_hf=to_hf, to_gguf=to_gguf, keep_f32=keep_f32)


# -- feed-forward ---------------------------------------------------------------------


def _mlp(config: PretrainedConfig, i: int) -> list[TensorMapping]:
    mlp = f"model.layers.{i}.mlp"
    blk = f"blk.{i}"
    if i < (config.first_k_dense_replace or 0):
        return gated_mlp_mappings(mlp, blk)
    out = [same_tensor(f"{mlp}.gate.weight", f"{blk}.ffn_gate_inp.weight", keep_f32=True)]
    if config.model_type == "deepseek_v3":
        out.append(same_tensor(f"{mlp}.gate.e_score_correction_bias", f"{blk}.exp_probs_b.bias", keep_f32=True))
    out += stacked_expert_mappings(mlp, blk)
    out += gated_mlp_mappings(f"{mlp}.shared_experts", blk, "_shexp")
    return out


__all__ = ["VIRTUAL_EXPERT_NAMES", "name_map"]
