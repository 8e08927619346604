"""The Qwen MoE operators against the transformers modules they replace.

Tolerances (float32 weights and activations everywhere):
- MoE blocks with transformers' own experts module, and the model operator with
  transformers' layers: the same arithmetic in the same order, so outputs are
  bit-identical (``torch.equal``).
- Anything through `KExpertsTorch`: it sums a token's k expert outputs in another order
  than transformers (grouped by expert, then ``index_add_``), a few float32 ulps per MoE
  layer. atol 1e-6 on block outputs of magnitude ~1e-2 and atol 1e-5 on logits of
  magnitude ~1 leave ~100 ulps of headroom while a wrong expert, weight or position
  changes results by more than 1e-3.
- Greedy tokens must be identical: a ~1e-6 logit difference cannot flip an argmax unless
  two logits tie to within it, which these seeded models do not.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import meta_model, qwen2_moe_config, qwen3_moe_config, random_model
from transformers import StaticCache

from kt_core.errors import KtUserError
from kt_core.inject import inject
from kt_core.operators.experts import KTransformersExperts
from kt_core.operators.linear import KTransformersLinear
from kt_core.planner import plan
from kt_core.rules import RuleFileError
from kt_core.weights.source import StateDictSource
from kt_models_qwen.model import KQwen2MoeModel, KQwen3MoeModel
from kt_models_qwen.moe import KQwen2MoeSparseMoeBlock, KQwen3MoeSparseMoeBlock
from kt_ops_torch.rmsnorm import RMSNorm
from kt_ops_torch.rope import RotaryEmbedding

# (config factory, MoE block operator, model operator, transformers class-name prefix)
ARCHS = {
    "qwen2": (qwen2_moe_config, KQwen2MoeSparseMoeBlock, KQwen2MoeModel, "Qwen2Moe"),
    "qwen3": (qwen3_moe_config, KQwen3MoeSparseMoeBlock, KQwen3MoeModel, "Qwen3Moe"),
}

EXPERTS_RULE = r"""
- match: {name: "^model\\.layers\\..*\\.mlp\\.experts$"}
  replace: {class: KTransformersExperts, kwargs: {generate_op: KExpertsTorch, out_device: cpu}}
  recursive: false
"""


def full_rules(prefix: str, block_op: str, model_op: str) -> str:
    """Every operator of the Qwen stack, as a user would write them."""
    return EXPERTS_RULE + rf"""
- match: {{name: "^model\\.layers\\.\\d+\\.mlp$", class: {prefix}SparseMoeBlock}}
  replace: {{class: {block_op}}}
- match: {{name: "^model$"}}
  replace: {{class: {model_op}, kwargs: {{transfer_map: {{0: cpu, 2: cpu}}}}}}
- match: {{name: "^model\\.rotary_emb$"}}
  replace: {{class: RotaryEmbedding}}
- match: {{class: {prefix}RMSNorm}}
  replace: {{class: RMSNorm}}
- match: {{name: "^model\\.layers\\.(?!.*self_attn).*$", class: torch.nn.Linear}}
  replace: {{class: KTransformersLinear, kwargs: {{generate_op: KLinearTorch}}}}
- match: {{name: "^lm_head$", class: torch.nn.Linear}}
  replace: {{class: KTransformersLinear, kwargs: {{generate_op: KLinearTorch}}}}
- match: {{name: "^model\\.(embed_tokens|layers)"}}
  replace: {{class: default, kwargs: {{generate_device: cpu}}}}
"""


def injected_copy(model, rules, registry):
    clone = copy.deepcopy(model)
    ops = inject(clone, plan(clone, rules), config=clone.config, source=StateDictSource(model.state_dict()),
                 registry=registry)
    for op in ops:
        op.load()
    return clone, ops


def count_calls(module, *names: str) -> dict[str, int]:
    """Wrap `module`'s methods `names` (on the instance) to count how often they run."""
    counts = dict.fromkeys(names, 0)
    for name in names:
        method = getattr(module, name)

        def counted(*args, _name=name, _method=method, **kwargs):
            counts[_name] += 1
            return _method(*args, **kwargs)

        setattr(module, name, counted)
    return counts


@pytest.fixture(scope="module", params=sorted(ARCHS))
def arch(request):
    make_config, block_op, model_op, prefix = ARCHS[request.param]
    return make_config, block_op, model_op, prefix, random_model(make_config())


def test_moe_block_with_transformers_experts_is_exact(arch):
    make_config, block_op, _, _, model = arch
    block = model.model.layers[1].mlp
    op = block_op("model.layers.1.mlp", StateDictSource(model.state_dict()), model.config, block)
    op.load()
    assert op.router_weight.dtype == torch.float32
    x = torch.randn(2, 7, model.config.hidden_size)
    with torch.no_grad():
        out = op(x)
        assert isinstance(out, torch.Tensor)  # transformers' block returns the tensor alone, no router logits
        assert torch.equal(out, block(x))


@pytest.mark.parametrize("num_tokens", [1, 9])
def test_moe_block_submits_to_ktransformers_experts(arch, registry, rules_from, num_tokens):
    _, block_op, _, prefix, model = arch
    rules = rules_from(EXPERTS_RULE + rf"""
- match: {{class: ktransformers.models.modeling_{prefix.lower().replace("moe", "_moe")}.{prefix}SparseMoeBlock}}
  replace: {{class: ktransformers.operators.experts.{block_op.__name__}}}
""")
    injected, ops = injected_copy(model, rules, registry)
    block = injected.model.layers[2].mlp
    assert isinstance(block, block_op) and isinstance(block.experts, KTransformersExperts)
    counts = count_calls(block.experts, "submit", "sync", "forward")
    x = torch.randn(1, num_tokens, model.config.hidden_size)
    with torch.no_grad():
        got, expected = block(x), model.model.layers[2].mlp(x)
    assert counts == {"submit": 1, "sync": 1, "forward": 0}
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_model_operator_alone_is_exact(arch, registry, rules_from):
    _, _, model_op, _, model = arch
    rules = rules_from(rf"""
- match: {{name: "^model$"}}
  replace: {{class: {model_op.__name__}, kwargs: {{transfer_map: {{0: cpu, 1: cpu}}}}}}
""")
    injected, (op,) = injected_copy(model, rules, registry)
    assert isinstance(op, model_op) and injected.model is op
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    with torch.no_grad():
        out, ref = injected.model(ids, output_hidden_states=True), model.model(ids, output_hidden_states=True)
        assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
        assert len(out.hidden_states) == len(ref.hidden_states) == model.config.num_hidden_layers + 1
        assert all(torch.equal(a, b) for a, b in zip(out.hidden_states, ref.hidden_states, strict=True))
        assert torch.equal(injected.model(ids, return_dict=False)[0], ref.last_hidden_state)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            injected.model(ids, output_attentions=True)


def build_injected_on_meta(model, arch_entry, registry, rules_from):
    """The kt runtime's path: build on meta, inject, load the operators from the source.

    Modules no rule replaces (attention projections, embeddings) stay on meta after that;
    they get their weights here from the same state dict, as the runtime will do for
    modules it keeps. Anything an operator forgot to load would stay meta and fail.
    """
    _, block_op, model_op, prefix, _ = arch_entry
    meta = meta_model(model.config)
    rules = rules_from(full_rules(prefix, block_op.__name__, model_op.__name__))
    source = StateDictSource(model.state_dict())
    ops = inject(meta, plan(meta, rules), config=meta.config, source=source, registry=registry)
    for op in ops:
        op.load()
    for name, param in list(meta.named_parameters()):
        if param.is_meta:
            owner_name, _, leaf = name.rpartition(".")
            owner = meta.get_submodule(owner_name)
            owner._parameters[leaf] = torch.nn.Parameter(source.load(name), requires_grad=False)
    return meta.eval(), ops


def test_full_injection_matches_transformers(arch, registry, rules_from):
    _, block_op, model_op, _, model = arch
    injected, ops = build_injected_on_meta(model, arch, registry, rules_from)
    kinds = {type(op) for op in ops}
    assert {block_op, model_op, RotaryEmbedding, RMSNorm, KTransformersExperts, KTransformersLinear} <= kinds
    assert not any(p.is_meta for p in injected.parameters()) and not injected.model.rotary_emb.inv_freq.is_meta

    prompt = torch.randint(0, model.config.vocab_size, (1, 11))
    max_len = prompt.shape[1] + 40
    caches = [StaticCache(config=model.config, max_cache_len=max_len) for _ in range(2)]

    def step(m, cache, ids, start):
        position_ids = torch.arange(start, start + ids.shape[1])[None]
        return m(ids, position_ids=position_ids, cache=cache, use_cache=True).logits[:, -1]

    with torch.no_grad():
        # Prompt, then several decode steps of the same (teacher-forced) tokens.
        got, ref = step(injected, caches[0], prompt, 0), step(model, caches[1], prompt, 0)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)
        for i, token in enumerate(torch.randint(0, model.config.vocab_size, (4,))):
            got = step(injected, caches[0], token.view(1, 1), prompt.shape[1] + i)
            ref = step(model, caches[1], token.view(1, 1), prompt.shape[1] + i)
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)

        # Greedy continuation of 32 tokens from fresh caches, each model feeding itself.
        continuations = []
        for m in (injected, model):
            cache = StaticCache(config=model.config, max_cache_len=max_len)
            next_token = step(m, cache, prompt, 0).argmax(-1, keepdim=True)
            tokens = [next_token]
            for position in range(prompt.shape[1], prompt.shape[1] + 31):
                next_token = step(m, cache, next_token, position).argmax(-1, keepdim=True)
                tokens.append(next_token)
            continuations.append(torch.cat(tokens, dim=1))
    assert continuations[0].shape == (1, 32)
    assert torch.equal(continuations[0], continuations[1])


def test_operators_reject_the_wrong_modules(registry, rules_from):
    model = meta_model(qwen2_moe_config())
    rules = rules_from(r"""
- match: {name: "^model\\.layers\\.0\\.mlp$"}
  replace: {class: KQwen3MoeSparseMoeBlock}
- match: {name: "^model\\.layers\\.1\\.mlp$"}
  replace: {class: KQwen2MoeModel}
""")
    with pytest.raises(RuleFileError) as info:
        inject(model, plan(model, rules), config=model.config, source=None, registry=registry)
    message = str(info.value)
    assert "KQwen3MoeSparseMoeBlock replaces Qwen3MoeSparseMoeBlock" in message
    assert "not Qwen2MoeSparseMoeBlock" in message
    assert "KQwen2MoeModel replaces the decoder stack" in message


def test_transfer_map_beyond_the_last_layer_is_an_error():
    model = meta_model(qwen3_moe_config())
    with pytest.raises(KtUserError, match=r"transfer_map names layer\(s\) \[3\], but the model has 3 layers"):
        KQwen3MoeModel("model", None, model.config, model.model, transfer_map={3: "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", sorted(ARCHS))
def test_transfer_map_moves_layers_to_cuda(name, registry, rules_from):
    """Layer 0 on the CPU, layers 1.. and the head on CUDA: same logits, prompt and decode."""
    make_config, _, model_op, _ = ARCHS[name]
    model = random_model(make_config())
    rules = rules_from(rf"""
- match: {{name: "^model$"}}
  replace: {{class: {model_op.__name__}, kwargs: {{transfer_map: {{1: cuda}}}}}}
""")
    injected, (op,) = injected_copy(model, rules, registry)
    for module in (*injected.model.layers[1:], injected.model.norm, injected.lm_head):
        module.to("cuda")
    prompt = torch.randint(0, model.config.vocab_size, (1, 7))
    caches = [StaticCache(config=model.config, max_cache_len=16) for _ in range(2)]
    with torch.no_grad():
        for ids, start in ((prompt, 0), (prompt[:, :1], 7), (prompt[:, 1:2], 8)):
            position_ids = torch.arange(start, start + ids.shape[1])[None]
            got = injected(ids, position_ids=position_ids, cache=caches[0], use_cache=True).logits
            ref = model(ids, position_ids=position_ids, cache=caches[1], use_cache=True).logits
            assert got.device.type == "cuda"
            # CUDA kernels (sdpa, matmul) round differently from the CPU ones: 1e-4 on logits ~1.
            torch.testing.assert_close(got.cpu(), ref, rtol=0, atol=1e-4)
