"""`KMLPCPUInfer`: a gated MLP as one engine job, against transformers' own MLP module.

The reference is the replaced module itself (DeepseekV2MLP / Qwen2MoeMLP, float64, on the
same dequantized weights); the allowed difference is `cpuinfer_refs.moe_reference`'s
bound for one expert at routing weight 1 — the activations' quantization error in
gate/up, carried through SiLU, plus down's own — which is what the MLP computes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpuinfer_refs import ISAS, BlockSource, dequantize, make_blocks, moe_reference
from torch import nn
from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2MLP
from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeMLP

from kt_core.backends import BackendMemory
from kt_ops_cpuinfer import _engine, use_isa
from kt_ops_cpuinfer.mlp import KMLPCPUInfer

KEY = "model.layers.1.mlp.shared_experts"
HIDDEN, INTER = 256, 512


def _mlp(kind: str) -> tuple[nn.Module, object]:
    if kind == "deepseek":
        config = DeepseekV2Config(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu")
        return DeepseekV2MLP(config, intermediate_size=INTER), config
    config = Qwen2MoeConfig(hidden_size=HIDDEN, intermediate_size=INTER, hidden_act="silu")
    return Qwen2MoeMLP(config, intermediate_size=INTER), config


def _blocks(types: tuple[str, str, str], seed: int) -> dict[str, tuple[str, tuple[int, int], np.ndarray]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    out = {}
    for (name, shape), ggml_type in zip(shapes.items(), types, strict=True):
        weight = torch.randn(*shape, generator=gen) * shape[1] ** -0.5
        out[f"{KEY}.{name}.weight"] = (ggml_type, shape, make_blocks(weight, ggml_type))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", ["deepseek", "qwen"])
@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q8_0"), ("Q8_0", "Q8_0", "Q8_0"), ("F32", "F32", "F32")])
def test_matches_the_replaced_mlp_on_the_same_weights(isa, kind, types):
    module, config = _mlp(kind)
    tensors = _blocks(types, seed=3)
    with use_isa(isa):
        op = KMLPCPUInfer(KEY, BlockSource(tensors), config, module.to("meta"), "cpu", threads=2)
        op.load()
    assert op.weight_types == dict(zip(("gate_proj", "up_proj", "down_proj"), types, strict=True))
    nbytes = sum(blocks.nbytes for _, _, blocks in tensors.values())
    assert op.memory().mapped == nbytes and op.memory().repacked == 0  # the stored blocks, in place

    values = {name.rsplit(".", 2)[-2]: dequantize(blocks, t).reshape(shape) for name, (t, shape, blocks) in tensors.items()}
    reference, _ = _mlp(kind)
    reference.load_state_dict({f"{p}.weight": torch.from_numpy(v) for p, v in values.items()})
    reference = reference.double()
    x = torch.randn(2, 3, HIDDEN, generator=torch.Generator().manual_seed(4))
    out = op(x.to(torch.bfloat16))
    assert out.shape == x.shape and out.dtype == torch.bfloat16
    y = op(x)
    with torch.no_grad():
        expected = reference(x.double()).reshape(-1, HIDDEN).numpy()
    formats = tuple(_engine.activation_format(isa, t) for t in types)
    rows = x.reshape(-1, HIDDEN).double().numpy()
    ones = np.ones((rows.shape[0], 1))
    ref, bound = moe_reference(rows, np.zeros((rows.shape[0], 1), np.int64), ones, values["gate_proj"][None],
                               values["up_proj"][None], values["down_proj"][None], formats)
    np.testing.assert_allclose(ref, expected, rtol=1e-9, atol=1e-9)  # the bound's reference is the module's
    err = np.abs(y.reshape(-1, HIDDEN).double().numpy() - expected)
    allowed = bound + 1e-6 * np.abs(expected).max()
    assert np.all(err <= allowed), f"worst error/bound {float((err / allowed).max()):.3f}"


def test_refuses_modules_that_are_not_gated_mlps():
    module, config = _mlp("deepseek")
    assert KMLPCPUInfer.accepts(module) is None
    assert "nn.Linear children gate_proj, up_proj, down_proj" in KMLPCPUInfer.accepts(nn.Linear(4, 4))
    module.up_proj = nn.Linear(HIDDEN, INTER, bias=True)
    assert "without biases" in KMLPCPUInfer.accepts(module)
    with pytest.raises(TypeError, match="without biases"):
        KMLPCPUInfer(KEY, BlockSource({}), config, module, "cpu")


def test_children_are_consumed_and_problems_found_before_loading():
    module, config = _mlp("deepseek")
    tensors = _blocks(("Q8_0", "Q8_0", "Q8_0"), seed=5)
    tensors[f"{KEY}.down_proj.weight"] = ("IQ4_NL", (HIDDEN, INTER), np.zeros((HIDDEN, INTER // 32 * 18), np.uint8))
    op = KMLPCPUInfer(KEY, BlockSource(tensors), config, module.to("meta"), "cpu")
    assert op.consumed_children() == ("gate_proj", "up_proj", "down_proj")
    (problem,) = op.check_weights()
    assert f"{KEY}.down_proj.weight" in problem and "is stored as IQ4_NL, which KMLPCPUInfer cannot compute on" in problem
    assert op.memory() == BackendMemory()
    with pytest.raises(RuntimeError, match="used before load"):
        op(torch.randn(1, HIDDEN))


def test_submit_then_sync_gives_the_forward_and_misuse_is_refused():
    """`submit`/`sync` (what lets a MoE block start the shared experts before routing) give
    forward's output exactly; a second submit or a sync without one is an error."""
    module, config = _mlp("deepseek")
    op = KMLPCPUInfer(KEY, BlockSource(_blocks(("Q4_K", "Q4_K", "Q8_0"), seed=5)), config, module.to("meta"), "cpu",
                      threads=2)
    op.load()
    x = torch.randn(1, 2, HIDDEN, generator=torch.Generator().manual_seed(6)).to(torch.bfloat16)
    expected = op(x)
    op.submit(x)
    with pytest.raises(RuntimeError, match="while a previous submit"):
        op.submit(x)
    out = op.sync()
    assert out.shape == x.shape and out.dtype == x.dtype and torch.equal(out, expected)
    with pytest.raises(RuntimeError, match="without a submit"):
        op.sync()
    op.submit(x)
    op.unload()  # waits for the job in flight before dropping the engine layer
    with pytest.raises(RuntimeError, match="used before load"):
        op.submit(x)
