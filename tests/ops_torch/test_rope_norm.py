"""RotaryEmbedding and RMSNorm against the transformers modules they replace.

Tolerance: none. Both operators run the original forward's arithmetic in the same order
on the same values (RoPE frequencies come from the same transformers function, the norm
weight from the same state dict), so every output must be bit-identical (`torch.equal`)
in float32 and bfloat16 alike. Any deviation means the operator computes something else.
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import deepseek_v2_config, meta_model, qwen2_moe_config, qwen3_moe_config, random_model
from torch import nn
from transformers import LlamaConfig, MixtralConfig
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm, DeepseekV2RotaryEmbedding
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralRotaryEmbedding
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeRMSNorm, Qwen2MoeRotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm, Qwen3MoeRotaryEmbedding

from kt_core.inject import inject
from kt_core.planner import plan
from kt_core.weights.source import StateDictSource
from kt_ops_torch.rmsnorm import RMSNorm
from kt_ops_torch.rope import RotaryEmbedding

_SMALL = dict(
    vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, head_dim=16, max_position_embeddings=64
)

# rope_parameters of every transformers rope_type that reads only the config (theta 10000).
ROPE_PARAMETERS = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "rope_theta": 10000.0},
    "llama3": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 10000.0,
    },
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
}

ROTARY_CLASSES = [
    (Qwen2MoeRotaryEmbedding, qwen2_moe_config),
    (Qwen3MoeRotaryEmbedding, qwen3_moe_config),
    (MixtralRotaryEmbedding, lambda **kw: MixtralConfig(**_SMALL, **kw)),
    (LlamaRotaryEmbedding, lambda **kw: LlamaConfig(**_SMALL, **kw)),
]


def loaded_rope(rotary_class: type[nn.Module], config) -> RotaryEmbedding:
    """The operator replacing a `rotary_class` built on meta, loaded on the CPU."""
    with torch.device("meta"):
        meta = rotary_class(config)
    assert RotaryEmbedding.accepts(meta) is None
    op = RotaryEmbedding("model.rotary_emb", None, config, meta)
    op.load()
    return op


@pytest.mark.parametrize("rope_type", sorted(ROPE_PARAMETERS))
@pytest.mark.parametrize(("rotary_class", "make_config"), ROTARY_CLASSES, ids=lambda v: getattr(v, "__name__", ""))
def test_rope_matches_original(rotary_class, make_config, rope_type):
    config = make_config(rope_parameters=dict(ROPE_PARAMETERS[rope_type]))
    ref = rotary_class(config)
    op = loaded_rope(rotary_class, config)
    assert op.inv_freq.device.type == "cpu" and op.attention_scaling == ref.attention_scaling
    # Positions up to 100 > max_position_embeddings: exercises yarn/llama3 extrapolation and
    # the dynamic type's frequency growth (then its reset back to short positions).
    for positions in (torch.arange(7)[None], torch.tensor([[3, 99, 100]]), torch.arange(5)[None]):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(1, positions.shape[1], 8, dtype=dtype)
            cos, sin = op(x, positions)
            ref_cos, ref_sin = ref(x, positions)
            assert cos.dtype == sin.dtype == dtype
            assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)


def test_rope_in_meta_built_model_is_computed_at_load(registry, rules_from):
    """The model is built on meta (inv_freq has no values); the injected op computes it at load."""
    config = qwen2_moe_config(rope_parameters=dict(ROPE_PARAMETERS["yarn"]))
    model = meta_model(config)
    assert model.model.rotary_emb.inv_freq.is_meta
    rules = rules_from(
        r"""
        - match: {class: ktransformers.models.modeling_qwen2_moe.Qwen2MoeRotaryEmbedding}
          replace: {class: ktransformers.operators.RoPE.RotaryEmbedding, kwargs: {generate_device: cpu}}
        """
    )
    (op,) = inject(model, plan(model, rules), config=config, source=None, registry=registry)
    assert model.model.rotary_emb is op
    op.load()
    ref = Qwen2MoeRotaryEmbedding(config)
    assert not op.inv_freq.is_meta and torch.equal(op.inv_freq, ref.inv_freq)
    positions = torch.arange(40)[None]
    x = torch.zeros(1, 40, 4)
    assert all(torch.equal(a, b) for a, b in zip(op(x, positions), ref(x, positions), strict=True))


def test_rope_rejects_other_modules():
    with torch.device("meta"):
        complex_rope = DeepseekV2RotaryEmbedding(deepseek_v2_config())
        norm = Qwen2MoeRMSNorm(8)
    assert "not a (cos, sin) pair" in RotaryEmbedding.accepts(complex_rope)
    assert "not Qwen2MoeRMSNorm" in RotaryEmbedding.accepts(norm)


def test_rope_used_before_load_is_an_error():
    with torch.device("meta"):
        meta = Qwen3MoeRotaryEmbedding(qwen3_moe_config())
    op = RotaryEmbedding("model.rotary_emb", None, qwen3_moe_config(), meta)
    with pytest.raises(RuntimeError, match="used before load"):
        op(torch.zeros(1, 1, 4), torch.zeros(1, 1, dtype=torch.long))


@pytest.mark.parametrize("norm_class", [Qwen2MoeRMSNorm, Qwen3MoeRMSNorm, DeepseekV2RMSNorm, DeepseekV3RMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_original(norm_class, dtype):
    torch.manual_seed(0)
    ref = norm_class(48, eps=1e-5).to(dtype)
    with torch.no_grad():
        ref.weight.copy_(1.0 + 0.1 * torch.randn(48))
    with torch.device("meta"):
        meta = norm_class(48, eps=1e-5).to(dtype)
    assert RMSNorm.accepts(meta) is None
    op = RMSNorm("model.norm", StateDictSource({"model.norm.weight": ref.weight.detach()}), qwen2_moe_config(), meta)
    op.load()
    x = (3.0 * torch.randn(2, 5, 48)).to(dtype)
    out = op(x)
    assert out.dtype == dtype and op.weight.dtype == dtype
    assert torch.equal(out, ref(x))


def test_rmsnorm_replaces_every_norm_of_a_model(registry, rules_from):
    """By rule, through a KTransformers alias, in a real model: logits unchanged."""
    model = random_model(qwen3_moe_config())
    injected = copy.deepcopy(model)
    rules = rules_from(
        r"""
        - match: {name: "norm$"}
          replace: {class: ktransformers.operators.layernorm.RMSNorm}
        """
    )
    ops = inject(injected, plan(injected, rules), config=model.config, source=StateDictSource(model.state_dict()),
                 registry=registry)
    assert len(ops) == 1 + 4 * 3  # final norm; input/post-attention norms and q_norm/k_norm of 3 layers
    for op in ops:
        op.load()
    ids = torch.randint(0, 128, (1, 6))
    with torch.no_grad():
        assert torch.equal(injected(ids).logits, model(ids).logits)


def test_rmsnorm_rejects_other_modules_and_bad_weights():
    assert "not LayerNorm" in RMSNorm.accepts(nn.LayerNorm(8))
    assert "not Linear" in RMSNorm.accepts(nn.Linear(8, 8))
    op = RMSNorm("n", StateDictSource({"n.weight": torch.ones(7)}), qwen2_moe_config(), Qwen2MoeRMSNorm(8))
    with pytest.raises(ValueError, match=r"n.weight has shape \(7,\), expected \(8,\)"):
        op.load()
    with pytest.raises(RuntimeError, match="used before load"):
        op(torch.zeros(1, 8))
