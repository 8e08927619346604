"""The DeepSeek operators against the transformers modules they replace, on the same weights.

Every comparison runs tiny float32 models (tests/tiny_models.py) and feeds the injected
copy the original's weights through a `StateDictSource`.

Tolerances. Float32 has eps ≈ 1.2e-7. Absorbed MLA computes ``(q W_UK)·c`` where
transformers computes ``q·(W_UK c)``, the expanded form adds the rope and nope scores
separately instead of in one matmul, and KExpertsTorch sums the top-k experts in
another order: each changes rounding, not math. Through three layers this gives logit
differences of ~2e-6 on logits of magnitude ~2.5 (measured); the bounds below
(atol 1e-5 + rtol 1e-5, i.e. ≤ 3.5e-5) leave ~10× headroom while still catching any
real error (a wrong scale, mask or rotary layout moves logits by >1e-2). Exact
operations (the rotary embedding, the cache contents, the routing choice) are compared
exactly or to a few ulps.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from tiny_models import deepseek_v2_config, deepseek_v3_config, meta_model, random_model
from transformers import PretrainedConfig, StaticCache

import kt_models_deepseek.mla_attention as mla_attention_module
from kt_core import cpu_matmul
from kt_core.errors import KtUserError
from kt_core.inject import inject
from kt_core.injected import BaseInjectedModule
from kt_core.operators.experts import KTransformersExperts
from kt_core.operators.linear import KTransformersLinear
from kt_core.planner import plan
from kt_core.weights.source import StateDictSource
from kt_models_deepseek.mla_attention import KDeepseekV2Attention
from kt_models_deepseek.mla_math import absorbed_attention, expanded_attention, matmul_projection, mla_softmax_scale
from kt_models_deepseek.model import KDeepseekV2Model, KDeepseekV3Model
from kt_models_deepseek.moe import KDeepseekV2MoE, KDeepseekV3MoE
from kt_models_deepseek.rope import YarnRotaryEmbedding
from kt_ops_cpuinfer.headwise import KHeadwiseLinearCPUInfer

LOGITS_TOL = dict(rtol=1e-5, atol=1e-5)

YARN = {
    "rope_type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "mscale": 1.0,
    "mscale_all_dim": 0.707,
    "beta_fast": 32,
    "beta_slow": 1,
    "rope_theta": 10000.0,
}

CONFIGS: dict[str, Callable[[], PretrainedConfig]] = {
    "v2": lambda: deepseek_v2_config(),
    "v2-lite": lambda: deepseek_v2_config(q_lora_rank=None),
    "v2-group-limited": lambda: deepseek_v2_config(topk_method="group_limited_greedy", n_group=4, topk_group=2),
    "v2-yarn": lambda: deepseek_v2_config(rope_parameters=dict(YARN)),
    "v3": lambda: deepseek_v3_config(),
    "v3-rotate-half": lambda: deepseek_v3_config(rope_interleave=False),
    "v3-yarn": lambda: deepseek_v3_config(rope_parameters=dict(YARN)),
}


def make_model(name: str) -> torch.nn.Module:
    """A tiny random model; V3 routers get a non-zero correction bias so it steers routing."""
    model = random_model(CONFIGS[name]())
    with torch.no_grad():
        for module in model.modules():
            bias = getattr(module, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.normal_(0.0, 0.3)
    return model


def is_v3(model: torch.nn.Module) -> bool:
    return model.config.model_type == "deepseek_v3"


def injected_copy(model, rules, registry):
    clone = copy.deepcopy(model)
    ops = inject(
        clone, plan(clone, rules), config=model.config, source=StateDictSource(model.state_dict()), registry=registry
    )
    for op in ops:
        op.load()
    return clone, ops


def stepwise_logits(model, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Prefill `prompt_len` tokens, then decode the rest one by one, through a StaticCache."""
    batch, total = ids.shape
    cache = StaticCache(config=model.config, max_cache_len=total + 3)
    positions = torch.arange(total).unsqueeze(0).expand(batch, total)
    steps = [(0, prompt_len)] + [(t, t + 1) for t in range(prompt_len, total)]
    outputs = []
    with torch.no_grad():
        for start, end in steps:
            out = model(ids[:, start:end], position_ids=positions[:, start:end], cache=cache, use_cache=True)
            outputs.append(out.logits)
    return torch.cat(outputs, dim=1)


def greedy(model, prompt: torch.Tensor, new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with a StaticCache; also the top-1/top-2 logit margin at each step."""
    cache = StaticCache(config=model.config, max_cache_len=prompt.shape[1] + new_tokens)
    tokens, margins = [], []
    ids, start = prompt, 0
    with torch.no_grad():
        for _ in range(new_tokens):
            positions = torch.arange(start, start + ids.shape[1]).unsqueeze(0)
            logits = model(ids, position_ids=positions, cache=cache, use_cache=True).logits[0, -1]
            top = torch.topk(logits, 2).values
            margins.append(float(top[0] - top[1]))
            token = int(logits.argmax())
            tokens.append(token)
            start += ids.shape[1]
            ids = torch.tensor([[token]])
    return tokens, margins


ATTENTION_RULE = r"""
- match: {{name: "^model\\.layers\\..*\\.self_attn$"}}
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {kwargs}
"""

ATTENTION_PATHS = {
    "absorbed": "{absorb_for_prefill: true}",  # every call absorbed, the prompt too
    "expanded": "{prefill_threshold: 1}",  # every call expanded, decode too
    "mixed": "{prefill_threshold: 4}",  # prompt of 8 expanded, decode steps absorbed
    # Every call absorbed, its per-head products and the attention core between them on the
    # CPU engine. The state dict has no stored halves, so the engine computes on the float32
    # halves cut from kv_b_proj, with float32 activations, and reads the float32 cache: the
    # same arithmetic as torch's up to summation order.
    "engine": "{absorb_op: KHeadwiseLinearCPUInfer, absorb_for_prefill: true}",
}


# -- attention ------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(ATTENTION_PATHS))
@pytest.mark.parametrize("config_name", ["v2", "v2-lite", "v2-yarn", "v3", "v3-rotate-half", "v3-yarn"])
def test_attention_prefill_and_decode_match_transformers(config_name, path, registry, rules_from, monkeypatch):
    calls = {"absorbed": 0, "expanded": 0, "engine": 0}
    real_core = KHeadwiseLinearCPUInfer.latent_attention

    def core_spy(*args, **kwargs):
        calls["engine"] += 1
        return real_core(*args, **kwargs)

    monkeypatch.setattr(KHeadwiseLinearCPUInfer, "latent_attention", core_spy)
    for kind in ("absorbed", "expanded"):
        real = getattr(mla_attention_module, f"{kind}_attention")

        def spy(*args, _real=real, _kind=kind, **kwargs):
            calls[_kind] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(mla_attention_module, f"{kind}_attention", spy)

    model = make_model(config_name)
    injected, ops = injected_copy(model, rules_from(ATTENTION_RULE.format(kwargs=ATTENTION_PATHS[path])), registry)
    assert len(ops) == model.config.num_hidden_layers and all(isinstance(op, KDeepseekV2Attention) for op in ops)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        torch.testing.assert_close(injected(ids, use_cache=False).logits, expected, **LOGITS_TOL)  # cache=None
    torch.testing.assert_close(stepwise_logits(injected, ids, prompt_len=8), expected, **LOGITS_TOL)

    if path == "engine":  # no torch attention at all: the core ran on the engine, per sequence
        assert calls["expanded"] == calls["absorbed"] == 0
        assert calls["engine"] == 2 * model.config.num_hidden_layers * (1 + 1 + 4)  # no-cache call, prompt, 4 steps
    elif path == "absorbed":
        assert calls["expanded"] == 0 and calls["absorbed"] > 0
    elif path == "expanded":
        assert calls["absorbed"] == 0 and calls["expanded"] > 0
    else:
        layers = model.config.num_hidden_layers
        assert calls["expanded"] == 2 * layers  # the no-cache call and the prompt
        assert calls["absorbed"] == 4 * layers  # the four decode steps


@pytest.mark.parametrize("config_name", ["v2", "v3"])
def test_attention_caches_exactly_the_transformers_latent(config_name, registry, rules_from):
    model = make_model(config_name)
    injected, _ = injected_copy(model, rules_from(ATTENTION_RULE.format(kwargs="{}")), registry)
    ids = torch.randint(0, model.config.vocab_size, (1, 7))
    positions = torch.arange(7).unsqueeze(0)
    ours, theirs = (StaticCache(config=model.config, max_cache_len=10) for _ in range(2))
    with torch.no_grad():
        injected(ids, position_ids=positions, cache=ours, use_cache=True)
        model(ids, position_ids=positions, cache=theirs, use_cache=True)
    kv_lora, rope = model.config.kv_lora_rank, model.config.qk_rope_head_dim
    for index, (mine, ref) in enumerate(zip(ours.layers, theirs.layers, strict=True)):
        assert mine.keys.shape == (1, 1, 10, kv_lora) and mine.values.shape == (1, 1, 10, rope)
        # Layer 0 sees identical inputs and computes its latents with the same modules: exact.
        # Later layers' inputs carry the earlier layers' rounding differences.
        tol = dict(rtol=0, atol=0) if index == 0 else LOGITS_TOL
        torch.testing.assert_close(mine.keys, ref.keys, **tol)
        torch.testing.assert_close(mine.values, ref.values, **tol)


@pytest.mark.parametrize(
    ("kwargs", "features", "expected"),
    [
        ("{}", ("amx_bf16",), torch.float32),
        ("{dtype: bfloat16}", (), torch.bfloat16),
        ("{absorb_op: KHeadwiseLinearCPUInfer}", ("avx512_bf16", "amx_bf16"), torch.bfloat16),
        ("{absorb_op: KHeadwiseLinearCPUInfer}", ("avx512_bf16",), torch.float32),
        ("{absorb_op: KHeadwiseLinearCPUInfer}", ("avx2",), torch.float32),
    ],
)
def test_absorbed_weights_are_float32_on_the_cpu_unless_a_dtype_is_given(
    kwargs, features, expected, registry, rules_from, monkeypatch
):
    """On the CPU the absorbed halves default to float32 even in a bfloat16 model (torch's
    one-row bfloat16 batched matmuls are ~10x slower there); the `dtype` kwarg overrides.
    With a per-head backend they serve only long prefills' expanded form: the model's dtype
    where the CPU has AMX-BF16, float32 where torch's bfloat16 matmuls take the slow
    generic path or AVX512-BF16 alone, slower than float32 too (`features` pretends which
    the CPU has)."""
    monkeypatch.setattr(cpu_matmul, "_cpu_capabilities", lambda: frozenset(features))
    model = make_model("v2-lite")
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what the runtime sets for --dtype bfloat16
    try:
        _, ops = injected_copy(model, rules_from(ATTENTION_RULE.format(kwargs=kwargs)), registry)
    finally:
        torch.set_default_dtype(previous)
    assert {op.w_uk.dtype for op in ops} == {expected} and {op.w_uv.dtype for op in ops} == {expected}


def test_engine_products_leave_kv_b_proj_unread(registry, rules_from):
    """With a per-head backend for every call, no float copy of kv_b_proj is made: its
    halves live in the backends (here as the fallback's float32 copy, counted as repacked),
    and the kept child stays on meta, which the runtime allows for consumed children."""
    reference = make_model("v2-lite")
    model = meta_model(reference.config)
    kwargs = ATTENTION_PATHS["engine"]
    ops = inject(model, plan(model, rules_from(ATTENTION_RULE.format(kwargs=kwargs))), config=model.config,
                 source=StateDictSource(reference.state_dict()), registry=registry)
    for op in ops:
        op.load()
    attn = ops[0]
    assert attn.w_uk is None and attn.w_uv is None and attn.kv_b_proj.weight.is_meta
    config = reference.config
    heads, nope, v_dim, rank = config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim, config.kv_lora_rank
    assert attn.absorb_uk.shape == (heads, rank, nope) and attn.absorb_uv.shape == (heads, v_dim, rank)
    assert attn.absorb_uk.memory().repacked == heads * rank * nope * 4
    assert "absorb_op=KHeadwiseLinearCPUInfer" in repr(attn)


def test_an_unknown_absorb_op_names_the_module_and_the_kind(registry, rules_from):
    model = make_model("v2-lite")
    rules = rules_from(ATTENTION_RULE.format(kwargs="{absorb_op: KLinearCPUInfer}"))
    with pytest.raises(KtUserError, match=r"self_attn: absorb_op: .*KLinearCPUInfer.* headwise-backend"):
        injected_copy(model, rules, registry)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("path", ["default", "engine"])
def test_attention_honours_a_padding_mask(attn_implementation, path, registry, rules_from, monkeypatch):
    """transformers' 4-D masks (boolean for sdpa, additive for eager) still hide padded keys.

    With the engine's attention core, whose keys must be a prefix per query, a padded batch
    falls back to torch's absorbed form on the engine's products."""
    model = make_model("v2")
    model.config._attn_implementation = attn_implementation
    kwargs = "{}" if path == "default" else ATTENTION_PATHS["engine"]
    monkeypatch.setattr(KHeadwiseLinearCPUInfer, "latent_attention", lambda *a, **k: pytest.fail("core used"))
    injected, _ = injected_copy(model, rules_from(ATTENTION_RULE.format(kwargs=kwargs)), registry)
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # left padding in the second row
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, use_cache=False).logits
        got = injected(ids, attention_mask=mask, use_cache=False).logits
    torch.testing.assert_close(got[0], expected[0], **LOGITS_TOL)
    torch.testing.assert_close(got[1, 3:], expected[1, 3:], **LOGITS_TOL)


@pytest.mark.parametrize("v_dim", [12, 32], ids=["v-narrower", "v-wider"])
@pytest.mark.parametrize("mask", ["causal", "offset", "a-query-sees-nothing"])
def test_expanded_and_absorbed_forms_agree(mask, v_dim, monkeypatch):
    """The expanded form (torch's fused attention: plain causal, or an additive mask; values
    or queries padded to one head size) and the absorbed one (matmuls and a masked softmax)
    are the same function, the query that sees nothing (a padded row) included: both give
    it the uniform average of the values, not zeros or NaN. float32 throughout; 1e-5 covers
    the different summation orders of O(1) results over sums of a few hundred terms (float32
    epsilon 1.2e-7)."""
    gen = torch.Generator().manual_seed(0)
    b, heads, nope, rope, latent = 2, 4, 16, 8, 32
    s, keys = (9, 9) if mask == "causal" else (6, 9)
    q_nope, q_pe = torch.randn(b, heads, s, nope, generator=gen), torch.randn(b, heads, s, rope, generator=gen)
    c_kv, k_pe = torch.randn(b, 1, keys, latent, generator=gen), torch.randn(b, 1, keys, rope, generator=gen)
    w_uk, w_uv = torch.randn(heads, nope, latent, generator=gen) * 0.2, torch.randn(heads, v_dim, latent, generator=gen)
    positions = torch.arange(keys - s, keys)
    visible = (torch.arange(keys)[None, :] <= positions[:, None]).expand(b, 1, s, keys).clone()
    if mask == "a-query-sees-nothing":
        visible[1, 0, 2] = False
    scale = (nope + rope) ** -0.5
    fused = torch.nn.functional.scaled_dot_product_attention
    causal_calls = []

    def spy(*args, **kwargs):
        causal_calls.append(kwargs.get("is_causal", False))
        return fused(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    expanded = expanded_attention(q_nope, q_pe, c_kv, k_pe, w_uk, w_uv, scale, visible)
    assert causal_calls == [mask == "causal"]  # a plain causal mask takes the kernel's block-skipping path
    absorbed = absorbed_attention(q_nope, q_pe, c_kv, k_pe, matmul_projection(w_uk),
                                  matmul_projection(w_uv.transpose(-1, -2)), scale, visible)
    assert expanded.shape == (b, heads, s, v_dim) and not expanded.isnan().any()
    torch.testing.assert_close(expanded, absorbed, rtol=1e-5, atol=1e-5)
    if mask == "a-query-sees-nothing":
        values = torch.matmul(c_kv, w_uv.transpose(-1, -2))  # [b, H, T, v]
        torch.testing.assert_close(expanded[1, :, 2], values[1].mean(dim=-2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("config_name", ["v2", "v2-yarn", "v3-yarn"])
def test_softmax_scale_includes_yarn_mscale(config_name):
    config = CONFIGS[config_name]()
    model = meta_model(config)
    assert mla_softmax_scale(config) == pytest.approx(model.model.layers[0].self_attn.scaling, rel=1e-12)
    plain = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    assert (mla_softmax_scale(config) > plain * 1.01) == ("yarn" in config_name)


def test_attention_rejects_other_modules():
    model = meta_model(deepseek_v2_config())
    reason = KDeepseekV2Attention.accepts(model.model.layers[0].mlp)
    assert reason is not None and "DeepseekV2Attention" in reason
    assert KDeepseekV2Attention.accepts(model.model.layers[0].self_attn) is None
    assert KDeepseekV2Attention.accepts(meta_model(deepseek_v3_config()).model.layers[0].self_attn) is None


# -- MoE ------------------------------------------------------------------------------


def moe_operator(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the transformers MoE block of layer 1, our operator built over a copy of it)."""
    original = model.model.layers[1].mlp
    cls = KDeepseekV3MoE if is_v3(model) else KDeepseekV2MoE
    op = cls("model.layers.1.mlp", StateDictSource(model.state_dict()), model.config, copy.deepcopy(original))
    op.load()
    return original, op


@pytest.mark.parametrize("config_name", ["v2", "v2-group-limited", "v3"])
def test_routing_matches_the_transformers_router(config_name):
    model = make_model(config_name)
    original, op = moe_operator(model)
    tokens = torch.randn(64, model.config.hidden_size)
    with torch.no_grad():
        _, ref_weights, ref_ids = original.gate(tokens)
        weights, ids = op.route(tokens)
    ref_ids, ref_order = ref_ids.sort(dim=-1)
    ids, order = ids.sort(dim=-1)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights.gather(1, order), ref_weights.gather(1, ref_order), rtol=0, atol=1e-7)
    assert weights.dtype == torch.float32


@pytest.mark.parametrize("config_name", ["v2", "v2-lite", "v2-group-limited", "v3"])
def test_moe_block_with_transformers_experts_matches(config_name):
    model = make_model(config_name)
    original, op = moe_operator(model)
    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        torch.testing.assert_close(op(x), original(x), rtol=1e-6, atol=1e-6)  # same experts module: ~ulps


MOE_RULES = r"""
- match: {{name: "^model\\.layers\\..*\\.mlp\\.experts$"}}
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {{generate_device: "cpu", generate_op: "KExpertsTorch", out_device: "cpu"}}
  recursive: false
- match: {{class: {moe_class}}}
  replace: {{class: {moe_op}}}
"""


def moe_rules(model) -> str:
    if is_v3(model):
        return MOE_RULES.format(
            moe_class="ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE",
            moe_op="ktransformers.operators.experts.KDeepseekV3MoE",
        )
    return MOE_RULES.format(
        moe_class="ktransformers.models.modeling_deepseek.DeepseekV2MoE",
        moe_op="ktransformers.operators.experts.KDeepseekV2MoE",
    )


@pytest.mark.parametrize("config_name", ["v2", "v2-group-limited", "v3"])
def test_moe_overlaps_shared_experts_with_submitted_routed_experts(config_name, registry, rules_from, monkeypatch):
    events: list[str] = []
    submit, sync = KTransformersExperts.submit, KTransformersExperts.sync

    def record_submit(self, *args):
        events.append("submit")
        return submit(self, *args)

    def record_sync(self):
        events.append("sync")
        return sync(self)

    monkeypatch.setattr(KTransformersExperts, "submit", record_submit)
    monkeypatch.setattr(KTransformersExperts, "sync", record_sync)

    model = make_model(config_name)
    injected, ops = injected_copy(model, rules_from(moe_rules(model)), registry)
    block = injected.model.layers[1].mlp
    assert isinstance(block, KDeepseekV3MoE if is_v3(model) else KDeepseekV2MoE)
    assert isinstance(block.experts, KTransformersExperts)
    block.shared_experts.register_forward_pre_hook(lambda module, args: events.append("shared"))

    x = torch.randn(2, 5, model.config.hidden_size)
    with torch.no_grad():
        got = block(x)
        expected = model.model.layers[1].mlp(x)
    assert events == ["submit", "shared", "sync"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # expert summation order differs

    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(injected(ids).logits, model(ids).logits, **LOGITS_TOL)


def test_moe_rejects_the_other_generation():
    v2 = meta_model(deepseek_v2_config()).model.layers[1].mlp
    v3 = meta_model(deepseek_v3_config()).model.layers[1].mlp
    assert KDeepseekV2MoE.accepts(v2) is None and KDeepseekV3MoE.accepts(v3) is None
    assert "DeepseekV2Moe" in KDeepseekV2MoE.accepts(v3)
    assert "DeepseekV3MoE" in KDeepseekV3MoE.accepts(v2)


# -- rotary embedding -----------------------------------------------------------------

ROPE_CONFIGS = {
    **{name: CONFIGS[name] for name in ("v2", "v2-yarn", "v3", "v3-yarn")},
    "v2-linear": lambda: deepseek_v2_config(
        rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    ),
    "v3-dynamic": lambda: deepseek_v3_config(
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}
    ),
}


@pytest.mark.parametrize("config_name", list(ROPE_CONFIGS))
def test_rotary_embedding_computed_at_load_matches_transformers(config_name):
    config = ROPE_CONFIGS[config_name]()
    reference = random_model(config).model.rotary_emb  # built on CPU: inv_freq computed at construction
    meta = meta_model(config)
    assert meta.model.rotary_emb.inv_freq.is_meta
    op = YarnRotaryEmbedding("model.rotary_emb", StateDictSource({}), config, meta.model.rotary_emb)
    op.load()
    assert op.inv_freq.device.type == "cpu"
    assert [n for n, b in op.named_buffers() if b.is_meta] == []
    x = torch.zeros(2, 3, config.hidden_size)
    # Positions past max_position_embeddings (256) make the dynamic type rescale.
    for positions in (torch.arange(20).unsqueeze(0).expand(2, -1), torch.arange(250, 300).unsqueeze(0).expand(2, -1)):
        got, expected = op(x, positions), reference(x, positions)
        if config.model_type == "deepseek_v2":
            assert got.is_complex()
            torch.testing.assert_close(got, expected, rtol=0, atol=0)
        else:
            for mine, ref in zip(got, expected, strict=True):
                torch.testing.assert_close(mine, ref, rtol=0, atol=0)
    assert op.attention_scaling == reference.attention_scaling


def test_rotary_embedding_rejects_other_modules():
    model = meta_model(deepseek_v2_config())
    assert "DeepseekV2RotaryEmbedding" in YarnRotaryEmbedding.accepts(model.model.norm)


# -- the whole model ------------------------------------------------------------------

MODEL_RULES = r"""
- match:
    name: "^model$"
  replace:
    class: {model_op}
    kwargs:
      transfer_map: {{1: "cpu", 2: "cpu"}}
- match:
    class: {rotary_class}
  replace:
    class: ktransformers.operators.RoPE.YarnRotaryEmbedding
- match:
    name: "^model\\.layers\\..*\\.self_attn$"
  replace:
    class: ktransformers.operators.attention.KDeepseekV2Attention
    kwargs: {{prefill_threshold: 4}}
- match:
    name: "^model\\.layers\\..*\\.mlp\\.experts$"
  replace:
    class: ktransformers.operators.experts.KTransformersExperts
    kwargs: {{generate_device: "cpu", generate_op: "KExpertsTorch", out_device: "cpu"}}
  recursive: false
- match:
    class: {moe_class}
  replace:
    class: {moe_op}
- match:
    name: "^model\\.layers\\.(?!.*self_attn).*$"
    class: torch.nn.Linear
  replace:
    class: ktransformers.operators.linear.KTransformersLinear
    kwargs: {{generate_device: "cpu", generate_op: "KLinearTorch"}}
- match:
    name: "^model\\.layers\\..*\\.|^lm_head"
  replace:
    class: "default"
    kwargs: {{generate_device: "cpu"}}
"""


def model_rules(model) -> str:
    if is_v3(model):
        return MODEL_RULES.format(
            model_op="KDeepseekV3Model",
            rotary_class="ktransformers.models.modeling_deepseek_v3.DeepseekV3YarnRotaryEmbedding",
            moe_class="ktransformers.models.modeling_deepseek_v3.DeepseekV3MoE",
            moe_op="ktransformers.operators.experts.KDeepseekV3MoE",
        )
    return MODEL_RULES.format(
        model_op="ktransformers.operators.models.KDeepseekV2Model",
        rotary_class="ktransformers.models.modeling_deepseek.DeepseekV2YarnRotaryEmbedding",
        moe_class="ktransformers.models.modeling_deepseek.DeepseekV2MoE",
        moe_op="ktransformers.operators.experts.KDeepseekV2MoE",
    )


@pytest.mark.parametrize("config_name", ["v2", "v2-lite", "v2-yarn", "v3", "v3-yarn"])
def test_fully_injected_model_matches_transformers(config_name, registry, rules_from):
    model = make_model(config_name)
    injected, ops = injected_copy(model, rules_from(model_rules(model)), registry)
    kinds = {type(op) for op in ops}
    model_op = KDeepseekV3Model if is_v3(model) else KDeepseekV2Model
    moe_op = KDeepseekV3MoE if is_v3(model) else KDeepseekV2MoE
    assert {
        model_op,
        YarnRotaryEmbedding,
        KDeepseekV2Attention,
        moe_op,
        KTransformersExperts,
        KTransformersLinear,
    } <= kinds
    assert injected.model.devices_by_layer == ["cpu", "cpu", "cpu"]

    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        torch.testing.assert_close(injected(ids, use_cache=False).logits, expected, **LOGITS_TOL)
    torch.testing.assert_close(stepwise_logits(injected, ids, prompt_len=9), expected, **LOGITS_TOL)

    prompt = ids[:1, :6]
    ours, _ = greedy(injected, prompt, 32)
    theirs, margins = greedy(model, prompt, 32)
    if ours != theirs:
        first = next(i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b)
        pytest.fail(f"greedy tokens diverge at step {first} (reference top-2 margin there: {margins[first]:.2e})")


def test_transfer_map_beyond_the_last_layer_is_an_error(registry, rules_from):
    model = meta_model(deepseek_v2_config())
    rules = rules_from(
        r"""
        - match: {name: "^model$"}
          replace: {class: KDeepseekV2Model, kwargs: {transfer_map: {3: "cpu"}}}
        """
    )
    with pytest.raises(KtUserError, match=r"transfer_map names layer\(s\) \[3\], but the model has 3 layers"):
        inject(model, plan(model, rules), config=model.config, source=None, registry=registry)


def test_operators_load_onto_a_meta_model_without_duplicating_weights(registry, rules_from):
    """Built on meta (as kt runs): kept kv_b_proj and gate children share the operators' tensors."""
    reference = make_model("v3")
    model = meta_model(reference.config)
    rules = rules_from(model_rules(reference))
    ops = inject(
        model,
        plan(model, rules),
        config=model.config,
        source=StateDictSource(reference.state_dict()),
        registry=registry,
    )
    for op in ops:
        op.load()
    attn = model.model.layers[1].self_attn
    assert attn.consumed_children() == ("kv_b_proj",)
    assert attn.kv_b_proj.weight.data_ptr() == attn.w_uk.data_ptr()
    moe = model.model.layers[1].mlp
    assert moe.consumed_children() == ("gate",)
    assert moe.gate.weight.data_ptr() == moe.router["weight"].data_ptr()
    assert moe.gate.e_score_correction_bias.data_ptr() == moe.router["e_score_correction_bias"].data_ptr()
    assert not model.model.rotary_emb.inv_freq.is_meta


@pytest.mark.parametrize("config_name", ["v2-lite", "v3"])
def test_runtime_builds_and_loads_the_rules_from_meta(config_name, registry, rules_from):
    """kt's own loader: meta build, inject, operators load, kept modules load (consumed children skipped)."""
    from kt_core.runtime.load import load_model

    reference = make_model(config_name)
    source = StateDictSource(reference.state_dict())
    loaded = load_model(reference.config, rules_from(model_rules(reference)), source, registry, dtype=torch.float32)
    ids = torch.randint(0, reference.config.vocab_size, (1, 10))
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
    torch.testing.assert_close(stepwise_logits(loaded.model, ids, prompt_len=6), expected, **LOGITS_TOL)


def _place_kept_modules(model: torch.nn.Module, result) -> None:
    """Move every kept module's own tensors to its planned device (what the runtime's loader does)."""
    for name, module in model.named_modules():
        if isinstance(module, BaseInjectedModule) or name not in result:
            continue
        device = torch.device(result[name].device)
        for attr, param in list(module.named_parameters(recurse=False)):
            module._parameters[attr] = torch.nn.Parameter(param.detach().to(device), requires_grad=False)
        for attr, buf in list(module.named_buffers(recurse=False)):
            module._buffers[attr] = buf.to(device)


CUDA_RULES = r"""
- match: {name: "^model$"}
  replace: {class: KDeepseekV2Model, kwargs: {generate_device: "cpu", transfer_map: {1: "cuda:0"}}}
- match: {name: "^model\\.rotary_emb$"}
  replace: {class: YarnRotaryEmbedding, kwargs: {generate_device: "cpu"}}
- match: {name: "^model\\.layers\\.0$"}
  replace: {class: default, kwargs: {generate_device: "cpu"}}
- match: {name: "^model\\.layers\\.[12]$|^model\\.norm$"}
  replace: {class: default, kwargs: {generate_device: "cuda:0"}}
- match: {name: "^model\\.layers\\..*\\.self_attn$"}
  replace: {class: KDeepseekV2Attention}
- match: {name: "^model\\.layers\\..*\\.mlp\\.experts$"}
  replace: {class: KTransformersExperts, kwargs: {generate_op: KExpertsTorch}}
  recursive: false
- match: {class: DeepseekV2Moe}
  replace: {class: KDeepseekV2MoE}
- match: {name: "^lm_head$"}
  replace: {class: KTransformersLinear, kwargs: {generate_device: "cpu", generate_op: KLinearTorch}}
"""


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_transfer_map_moves_layers_to_cuda(registry, rules_from):
    model = make_model("v2")
    injected = copy.deepcopy(model)
    result = plan(injected, rules_from(CUDA_RULES))
    ops = inject(injected, result, config=model.config, source=StateDictSource(model.state_dict()), registry=registry)
    for op in ops:
        op.load()
    _place_kept_modules(injected, result)
    assert injected.model.devices_by_layer == ["cpu", "cuda:0", "cuda:0"]
    assert injected.model.layers[2].self_attn.w_uk.device.type == "cuda"

    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    with torch.no_grad():
        expected = model(ids, use_cache=False).logits
        got = injected(ids, use_cache=False).logits
    assert got.device.type == "cuda"  # the final norm ran on the last layer's device
    # CUDA kernels sum in other orders (and blocks) than CPU ones: allow 10x the CPU bounds.
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stepwise_logits(injected, ids, prompt_len=8).cpu(), expected, rtol=1e-4, atol=1e-4)
