"""DeepSeek-V2/V2-Lite/V3 ⇄ GGUF ``deepseek2``: name map, tensor transforms and config metadata.

Every check goes through tiny random transformers models: the map must cover their state
dict, `to_gguf` then `to_hf` must give back the same tensors, the GGUF tensors must have
the shapes llama.cpp's loader creates, and a model rebuilt from the GGUF metadata and
tensors must compute the same logits as the original.
"""

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
from tiny_models import deepseek_v2_config, deepseek_v3_config, random_model

from kt_core.errors import KtUserError
from kt_models_deepseek import gguf_config
from kt_models_deepseek.gguf_config import config_from_gguf, gguf_metadata
from kt_models_deepseek.gguf_names import VIRTUAL_EXPERT_NAMES, name_map

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 0.707,
    "mscale_all_dim": 0.707,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
}

CASES = {
    "v2": lambda: deepseek_v2_config(),
    "v2-lite": lambda: deepseek_v2_config(q_lora_rank=None),
    "v2-grouped-yarn": lambda: deepseek_v2_config(
        n_group=4, topk_group=2, topk_method="group_limited_greedy", routed_scaling_factor=16.0, rope_parameters=YARN
    ),
    "v3": lambda: deepseek_v3_config(),
    "v3-no-q-lora": lambda: deepseek_v3_config(q_lora_rank=None),
    "v3-rope-not-interleaved": lambda: deepseek_v3_config(rope_interleave=False),
}


def _model(config):
    model = random_model(config)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn_like(buffer))
    return model


def expected_gguf_shapes(c) -> dict[str, tuple[int, ...]]:
    """The tensors llama.cpp's deepseek2 loader creates (its ``ne`` reversed), current MLA form."""
    heads, nope, rope, v, rank = (
        c.num_attention_heads,
        c.qk_nope_head_dim,
        c.qk_rope_head_dim,
        c.v_head_dim,
        c.kv_lora_rank,
    )
    h, e, i_exp = c.hidden_size, c.n_routed_experts, c.moe_intermediate_size
    shapes = {"token_embd.weight": (c.vocab_size, h), "output_norm.weight": (h,), "output.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        b = f"blk.{i}."
        shapes |= {
            b + "attn_norm.weight": (h,),
            b + "ffn_norm.weight": (h,),
            b + "attn_kv_a_mqa.weight": (rank + rope, h),
            b + "attn_kv_a_norm.weight": (rank,),
            b + "attn_k_b.weight": (heads, rank, nope),
            b + "attn_v_b.weight": (heads, v, rank),
            b + "attn_output.weight": (h, heads * v),
        }
        if c.q_lora_rank is None:
            shapes[b + "attn_q.weight"] = (heads * (nope + rope), h)
        else:
            shapes |= {
                b + "attn_q_a.weight": (c.q_lora_rank, h),
                b + "attn_q_a_norm.weight": (c.q_lora_rank,),
                b + "attn_q_b.weight": (heads * (nope + rope), c.q_lora_rank),
            }
        if i < c.first_k_dense_replace:
            shapes |= {
                b + "ffn_gate.weight": (c.intermediate_size, h),
                b + "ffn_up.weight": (c.intermediate_size, h),
                b + "ffn_down.weight": (h, c.intermediate_size),
            }
            continue
        shared = i_exp * c.n_shared_experts
        shapes |= {
            b + "ffn_gate_inp.weight": (e, h),
            b + "ffn_gate_exps.weight": (e, i_exp, h),
            b + "ffn_up_exps.weight": (e, i_exp, h),
            b + "ffn_down_exps.weight": (e, h, i_exp),
            b + "ffn_gate_shexp.weight": (shared, h),
            b + "ffn_up_shexp.weight": (shared, h),
            b + "ffn_down_shexp.weight": (h, shared),
        }
        if c.model_type == "deepseek_v3":
            shapes[b + "exp_probs_b.bias"] = (e,)
    return shapes


@pytest.fixture(params=sorted(CASES), scope="module")
def case(request):
    config = CASES[request.param]()
    model = _model(config)
    return config, model, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_map_covers_state_dict_and_adds_only_virtual_expert_names(case):
    config, _, state = case
    names = {m.hf_name for m in name_map(config, None)}
    assert set(state) - names == set()
    extra = names - set(state)
    assert extra and all(n.endswith(VIRTUAL_EXPERT_NAMES) for n in extra)
    moe_layers = range(config.first_k_dense_replace, config.num_hidden_layers)
    assert extra == {f"model.layers.{i}.{s}" for i in moe_layers for s in VIRTUAL_EXPERT_NAMES}


def test_gguf_names_and_shapes_are_what_llama_cpp_loads(case):
    config, _, state = case
    tensors = to_gguf(name_map(config, None), state)
    assert {k: tuple(v.shape) for k, v in tensors.items()} == expected_gguf_shapes(config)
    assert not any("attn_kv_b" in n for n in tensors), "the current converter writes split k_b/v_b only"


def test_to_gguf_then_to_hf_round_trips_exactly(case):
    config, _, state = case
    _, back = assert_round_trips_exactly(name_map, config, state)
    for i in range(config.first_k_dense_replace, config.num_hidden_layers):
        prefix = f"model.layers.{i}.mlp.experts."
        gate_up = state[prefix + "gate_up_proj"]
        inter = config.moe_intermediate_size
        assert torch.equal(back[prefix + "gate_proj"], gate_up[:, :inter])
        assert torch.equal(back[prefix + "up_proj"], gate_up[:, inter:])


def test_k_b_v_b_split_is_the_converters(case):
    """k_b is each head's key rows transposed, v_b each head's value rows, in head order."""
    config, _, state = case
    tensors = to_gguf(name_map(config, None), state)
    kv_b = state["model.layers.0.self_attn.kv_b_proj.weight"]
    nope, v = config.qk_nope_head_dim, config.v_head_dim
    for h in range(config.num_attention_heads):
        rows = kv_b[h * (nope + v) : (h + 1) * (nope + v)]
        assert torch.equal(tensors["blk.0.attn_k_b.weight"][h], rows[:nope].T)
        assert torch.equal(tensors["blk.0.attn_v_b.weight"][h], rows[nope:])


def test_reading_a_split_file_also_names_the_stored_halves(case):
    """A per-head backend reads attn_k_b/attn_v_b as stored under kv_b_proj.k_b/.v_b; only
    reading adds those names (writing must produce each GGUF tensor once), and a legacy
    file, which has no stored halves, has none."""
    config, _, state = case
    tensors = to_gguf(name_map(config, None), state)
    nm = name_map(config, frozenset(tensors))
    for i in range(config.num_hidden_layers):
        for half in ("k_b", "v_b"):
            mapping = nm.get(f"model.layers.{i}.self_attn.kv_b_proj.{half}")
            assert mapping.gguf_names == (f"blk.{i}.attn_{half}.weight",) and mapping.is_identity
    assert nm.get("model.layers.0.self_attn.kv_b_proj.k_b") is not None
    assert name_map(config, None).get("model.layers.0.self_attn.kv_b_proj.k_b") is None
    legacy = {n: t for n, t in tensors.items() if not n.endswith(("attn_k_b.weight", "attn_v_b.weight"))}
    legacy |= {f"blk.{i}.attn_kv_b.weight": state[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
               for i in range(config.num_hidden_layers)}
    assert name_map(config, frozenset(legacy)).get("model.layers.0.self_attn.kv_b_proj.k_b") is None


@pytest.mark.parametrize("keep_split", [False, True], ids=["legacy-only", "legacy-and-split"])
def test_legacy_attn_kv_b_files_are_read(case, keep_split):
    config, _, state = case
    tensors = to_gguf(name_map(config, None), state)
    for i in range(config.num_hidden_layers):
        tensors[f"blk.{i}.attn_kv_b.weight"] = state[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
        if not keep_split:
            del tensors[f"blk.{i}.attn_k_b.weight"], tensors[f"blk.{i}.attn_v_b.weight"]
    nm = name_map(config, frozenset(tensors))
    mapping = nm.get("model.layers.1.self_attn.kv_b_proj.weight")
    assert mapping.gguf_names == ("blk.1.attn_kv_b.weight",) and mapping.is_identity
    back = to_hf(nm, tensors)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_keep_f32_marks_what_llama_cpp_keeps_in_f32(case):
    config, _, state = case
    assert_keep_f32_marks_what_llama_cpp_keeps_in_f32(name_map(config, None), state, ".ffn_gate_inp.")


FORWARD_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "n_routed_experts",
    "num_experts_per_tok",
    "n_shared_experts",
    "first_k_dense_replace",
    "routed_scaling_factor",
    "kv_lora_rank",
    "q_lora_rank",
    "qk_rope_head_dim",
    "qk_nope_head_dim",
    "v_head_dim",
    "qk_head_dim",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "n_group",
    "topk_group",
    "norm_topk_prob",
    "hidden_act",
    "tie_word_embeddings",
)


def assert_same_forward_config(config, rebuilt) -> None:
    assert type(rebuilt) is type(config)
    for field in FORWARD_FIELDS + (("topk_method",) if config.model_type == "deepseek_v2" else ()):
        assert getattr(rebuilt, field) == getattr(config, field), field
    rope = {k: v for k, v in config.rope_parameters.items() if k != "type"}  # legacy spelling of rope_type
    assert rebuilt.rope_parameters.keys() == rope.keys()
    for key, value in rope.items():
        assert rebuilt.rope_parameters[key] == pytest.approx(value), key
    if config.model_type == "deepseek_v3":
        assert rebuilt.rope_interleave is True  # the GGUF weights are stored interleaved


def test_metadata_round_trip_keeps_the_forward_pass_fields(case):
    config, _, _ = case
    assert_same_forward_config(config, config_from_gguf(gguf_metadata(config)))


SHIPPED_CONFIGS = shipped_configs(gguf_config)


@pytest.mark.parametrize("path", SHIPPED_CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_survive_the_metadata_round_trip(path):
    config = config_from_json(path)
    assert_same_forward_config(config, config_from_gguf(gguf_metadata(config)))


def test_model_rebuilt_from_gguf_computes_the_same_logits(case):
    config, model, state = case
    assert_rebuilt_model_computes_the_same_logits(name_map, config_from_gguf, gguf_metadata, config, model, state)


def test_rope_permutation_is_needed_for_non_interleaved_v3():
    """Control for the test above: without the permutation the non-interleaved model differs."""
    config = deepseek_v3_config(rope_interleave=False)
    model = _model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "q_b_proj" in name or "kv_a_proj" in name:
                param.mul_(8.0)
    interleaved = type(model)(config_from_gguf(gguf_metadata(config))).eval()
    interleaved.load_state_dict(model.state_dict())
    ids = torch.randint(0, config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (interleaved(ids).logits - model(ids).logits).abs().max() > 1e-3


@pytest.mark.parametrize(
    "config",
    [deepseek_v2_config(attention_bias=True), deepseek_v3_config(attention_bias=True, rope_interleave=False)],
    ids=["v2", "v3-rope-not-interleaved"],
)
def test_attention_biases_are_mapped(config):
    """No released DeepSeek has attention biases (metadata does not record them), but the map covers them."""
    state = _model(config).state_dict()
    nm = name_map(config, None)
    assert set(state) <= {m.hf_name for m in nm}
    tensors = to_gguf(nm, state)
    kv_a_rows = config.kv_lora_rank + config.qk_rope_head_dim
    assert tensors["blk.0.attn_kv_a_mqa.bias"].shape == (kv_a_rows,)
    assert tensors["blk.0.attn_output.bias"].shape == (config.hidden_size,)
    back = to_hf(name_map(config, frozenset(tensors)), tensors)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_tied_embeddings_write_no_output_and_read_token_embd():
    assert_tied_embeddings_write_no_output_and_read_token_embd(name_map, deepseek_v2_config(tie_word_embeddings=True))


def test_legacy_metadata_without_mla_keys_or_gating_is_read_as_v2():
    """Files from before llama.cpp's MLA change: real head sizes in key/value_length, no gating key."""
    config = deepseek_v2_config(q_lora_rank=None)
    md = gguf_metadata(config)
    for key in (
        "attention.key_length_mla",
        "attention.value_length_mla",
        "expert_gating_func",
        "expert_group_count",
        "expert_group_used_count",
        "expert_weights_norm",
    ):
        del md[f"deepseek2.{key}"]
    md["deepseek2.attention.key_length"] = config.qk_nope_head_dim + config.qk_rope_head_dim
    md["deepseek2.attention.value_length"] = config.v_head_dim
    md["deepseek2.attention.head_count_kv"] = config.num_attention_heads
    rebuilt = config_from_gguf(md)
    assert rebuilt.model_type == "deepseek_v2" and rebuilt.topk_method == "greedy"
    assert (rebuilt.qk_nope_head_dim, rebuilt.v_head_dim, rebuilt.q_lora_rank) == (16, 16, None)
    assert rebuilt.num_key_value_heads == config.num_attention_heads


def test_sigmoid_gating_builds_a_v3_config_and_yarn_without_log_multiplier_leaves_cos_sin_unscaled():
    md = gguf_metadata(deepseek_v3_config(rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0)))
    del md["deepseek2.rope.scaling.yarn_log_multiplier"]
    rebuilt = config_from_gguf(md)
    assert rebuilt.model_type == "deepseek_v3" and rebuilt.n_group == 4 and rebuilt.topk_group == 2
    assert rebuilt.rope_parameters["attention_factor"] == 1.0 and "mscale_all_dim" not in rebuilt.rope_parameters


def test_token_ids_come_from_the_tokenizer_metadata():
    md = gguf_metadata(deepseek_v3_config())
    md |= {"tokenizer.ggml.bos_token_id": 5, "tokenizer.ggml.eos_token_id": 7, "tokenizer.ggml.padding_token_id": 9}
    rebuilt = config_from_gguf(md)
    assert (rebuilt.bos_token_id, rebuilt.eos_token_id, rebuilt.pad_token_id) == (5, 7, 9)


@pytest.mark.parametrize("key", ["attention.kv_lora_rank", "block_count", "expert_shared_count"])
def test_missing_required_key_names_the_key_and_architecture(key):
    md = gguf_metadata(deepseek_v3_config())
    del md[f"deepseek2.{key}"]
    with pytest.raises(KtUserError, match=rf"deepseek2\.{key}.*'deepseek2'"):
        config_from_gguf(md)


def test_other_architectures_are_refused():
    md = gguf_metadata(deepseek_v3_config()) | {"general.architecture": "qwen3moe"}
    with pytest.raises(KtUserError, match="qwen3moe"):
        config_from_gguf(md)


def test_mismatched_k_b_shapes_are_a_user_error():
    config = deepseek_v2_config()
    state = _model(config).state_dict()
    tensors = to_gguf(name_map(config, None), state)
    tensors["blk.0.attn_k_b.weight"] = tensors["blk.0.attn_k_b.weight"][:, :, :-1]
    mapping = name_map(config, frozenset(tensors)).get("model.layers.0.self_attn.kv_b_proj.weight")
    with pytest.raises(KtUserError, match="attn_k_b"):
        mapping.to_hf([tensors[g] for g in mapping.gguf_names])
