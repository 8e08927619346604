"""Qwen2-MoE / Qwen3-MoE ⇄ GGUF ``qwen2moe`` / ``qwen3moe``: name map, transforms and config metadata."""

from __future__ import annotations

import pytest
import torch
from gguf_name_checks import (
    assert_keep_f32_marks_what_llama_cpp_keeps_in_f32,
    assert_rebuilt_model_computes_the_same_logits,
    assert_round_trips_exactly,
    assert_tied_embeddings_write_no_output_and_read_token_embd,
    config_from_json,
    shipped_configs,
    to_gguf,
    to_hf,
)
from tiny_models import qwen2_moe_config, qwen3_moe_config, random_model

from kt_core.errors import KtUserError
from kt_models_qwen import gguf_config
from kt_models_qwen.gguf_config import config_from_gguf, gguf_metadata
from kt_models_qwen.gguf_names import VIRTUAL_EXPERT_NAMES, name_map

YARN = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0, "original_max_position_embeddings": 64}

CASES = {
    "qwen2moe": lambda: qwen2_moe_config(),
    "qwen3moe": lambda: qwen3_moe_config(),
    "qwen3moe-yarn": lambda: qwen3_moe_config(rope_parameters=YARN),
}


def expected_gguf_shapes(c) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's qwen2moe / qwen3moe loaders create (their ``ne`` reversed)."""
    h, e, i_exp = c.hidden_size, c.num_experts, c.moe_intermediate_size
    head_dim = getattr(c, "head_dim", None) or h // c.num_attention_heads
    q, kv = c.num_attention_heads * head_dim, c.num_key_value_heads * head_dim
    shapes = {"token_embd.weight": (c.vocab_size, h), "output_norm.weight": (h,), "output.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (h,),
            b + "ffn_norm.weight": (h,),
            b + "attn_q.weight": (q, h),
            b + "attn_k.weight": (kv, h),
            b + "attn_v.weight": (kv, h),
            b + "attn_output.weight": (h, q),
            b + "ffn_gate_inp.weight": (e, h),
            b + "ffn_gate_exps.weight": (e, i_exp, h),
            b + "ffn_up_exps.weight": (e, i_exp, h),
            b + "ffn_down_exps.weight": (e, h, i_exp),
        }
        if c.model_type == "qwen2_moe":
            s = c.shared_expert_intermediate_size
            shapes |= {
                b + "attn_q.bias": (q,),
                b + "attn_k.bias": (kv,),
                b + "attn_v.bias": (kv,),
                b + "ffn_gate_shexp.weight": (s, h),
                b + "ffn_up_shexp.weight": (s, h),
                b + "ffn_down_shexp.weight": (h, s),
                b + "ffn_gate_inp_shexp.weight": (1, h),
            }
        else:
            shapes |= {b + "attn_q_norm.weight": (head_dim,), b + "attn_k_norm.weight": (head_dim,)}
            if c.attention_bias:
                shapes |= {
                    b + "attn_q.bias": (q,),
                    b + "attn_k.bias": (kv,),
                    b + "attn_v.bias": (kv,),
                    b + "attn_output.bias": (h,),
                }
    return shapes


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request):
    config = CASES[request.param]()
    model = random_model(config)
    return config, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_map_covers_state_dict_and_adds_only_virtual_expert_names(case):
    config, _, state = case
    names = {m.hf_name for m in name_map(config, None)}
    assert set(state) - names == set()
    assert names - set(state) == {
        f"model.layers.{i}.{s}" for i in range(config.num_hidden_layers) for s in VIRTUAL_EXPERT_NAMES
    }


def test_gguf_names_and_shapes_are_what_llama_cpp_loads(case):
    config, _, state = case
    tensors = to_gguf(name_map(config, None), state)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_gguf_shapes(config)


def test_to_gguf_then_to_hf_round_trips_exactly(case):
    config, _, state = case
    tensors, back = assert_round_trips_exactly(name_map, config, state)
    gate_up = state["model.layers.1.mlp.experts.gate_up_proj"]
    inter = config.moe_intermediate_size
    assert torch.equal(back["model.layers.1.mlp.experts.gate_proj"], gate_up[:, :inter])
    assert torch.equal(back["model.layers.1.mlp.experts.up_proj"], gate_up[:, inter:])
    assert torch.equal(tensors["blk.1.ffn_gate_exps.weight"], gate_up[:, :inter])


def test_keep_f32_marks_what_llama_cpp_keeps_in_f32(case):
    config, _, state = case
    assert_keep_f32_marks_what_llama_cpp_keeps_in_f32(name_map(config, None), state, ".ffn_gate_inp")


FORWARD_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_experts",
    "num_experts_per_tok",
    "norm_topk_prob",
    "max_position_embeddings",
    "rms_norm_eps",
    "decoder_sparse_step",
    "mlp_only_layers",
    "hidden_act",
    "tie_word_embeddings",
    "rope_parameters",
)


def assert_same_forward_config(config, rebuilt) -> None:
    assert type(rebuilt) is type(config)
    extra = ("shared_expert_intermediate_size", "qkv_bias") if config.model_type == "qwen2_moe" else ("head_dim",)
    for field in FORWARD_FIELDS + extra:
        assert getattr(rebuilt, field) == getattr(config, field), field


def test_metadata_round_trip_keeps_the_forward_pass_fields(case):
    config, _, _ = case
    md = gguf_metadata(config)
    assert md["general.architecture"] == {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}[config.model_type]
    assert_same_forward_config(config, config_from_gguf(md))


SHIPPED_CONFIGS = shipped_configs(gguf_config)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_survive_the_metadata_round_trip(path):
    config = config_from_json(path)
    assert_same_forward_config(config, config_from_gguf(gguf_metadata(config)))


def test_model_rebuilt_from_gguf_computes_the_same_logits(case):
    config, model, state = case
    assert_rebuilt_model_computes_the_same_logits(name_map, config_from_gguf, gguf_metadata, config, model, state)


def test_qwen3_attention_biases_map_to_llama_cpp_names():
    """No released Qwen3-MoE has biases (so metadata does not record them), but the map covers them."""
    config = qwen3_moe_config(attention_bias=True)
    state = random_model(config).state_dict()
    nm = name_map(config, None)
    assert set(state) <= {m.hf_name for m in nm}
    tensors = to_gguf(nm, state)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_gguf_shapes(config)
    back = to_hf(name_map(config, frozenset(tensors)), tensors)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_squeezed_shared_expert_gate_from_older_converters_is_read():
    config = qwen2_moe_config()
    state = random_model(config).state_dict()
    tensors = to_gguf(name_map(config, None), state)
    tensors["blk.0.ffn_gate_inp_shexp.weight"] = tensors["blk.0.ffn_gate_inp_shexp.weight"].reshape(-1)
    back = to_hf(name_map(config, frozenset(tensors)), tensors)
    assert torch.equal(
        back["model.layers.0.mlp.shared_expert_gate.weight"], state["model.layers.0.mlp.shared_expert_gate.weight"]
    )


def test_routing_normalization_defaults_follow_llama_cpp():
    for config, expected in (
        (qwen2_moe_config(norm_topk_prob=True), False),
        (qwen3_moe_config(norm_topk_prob=False), True),
    ):
        md = gguf_metadata(config)
        del md[f"{md['general.architecture']}.expert_weights_norm"]
        assert config_from_gguf(md).norm_topk_prob is expected


def test_qwen3_head_dim_comes_from_key_length():
    md = gguf_metadata(qwen3_moe_config(head_dim=32))
    assert config_from_gguf(md).head_dim == 32
    del md["qwen3moe.attention.key_length"]
    assert config_from_gguf(md).head_dim == 64 // 4


def test_tied_embeddings_write_no_output_and_read_token_embd():
    assert_tied_embeddings_write_no_output_and_read_token_embd(name_map, qwen3_moe_config(tie_word_embeddings=True))


def test_dense_layers_cannot_be_written():
    with pytest.raises(KtUserError, match="experts in every layer"):
        gguf_metadata(qwen2_moe_config(mlp_only_layers=[0]))
    nm = name_map(qwen2_moe_config(mlp_only_layers=[0]), None)
    assert nm.get("model.layers.0.mlp.gate_proj.weight").gguf_names == ("blk.0.ffn_gate.weight",)


def test_architecture_must_be_a_qwen_moe():
    md = gguf_metadata(qwen3_moe_config())
    with pytest.raises(KtUserError, match="'deepseek2'"):
        config_from_gguf(md | {"general.architecture": "deepseek2"})
    del md["general.architecture"]
    with pytest.raises(KtUserError, match="None"):
        config_from_gguf(md)


@pytest.mark.parametrize("key", ["expert_shared_feed_forward_length", "attention.layer_norm_rms_epsilon"])
def test_missing_required_key_names_the_key_and_architecture(key):
    md = gguf_metadata(qwen2_moe_config())
    del md[f"qwen2moe.{key}"]
    with pytest.raises(KtUserError, match=rf"qwen2moe\.{key}.*'qwen2moe'"):
        config_from_gguf(md)


def test_vocab_size_falls_back_to_the_token_count():
    md = gguf_metadata(qwen2_moe_config())
    del md["qwen2moe.vocab_size"]
    md["tokenizer.ggml.tokens"] = [f"t{i}" for i in range(200)]
    assert config_from_gguf(md).vocab_size == 200
    del md["tokenizer.ggml.tokens"]
    with pytest.raises(KtUserError, match="vocab_size"):
        config_from_gguf(md)
