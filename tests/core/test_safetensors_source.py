"""`SafetensorsSource`: single/sharded checkpoints and both expert layouts, against real models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kt_core.errors import KtUserError
from kt_core.weights.safetensors_source import SafetensorsFormatError, SafetensorsSource
from kt_core.weights.source import MissingTensorError, WeightSource

transformers = pytest.importorskip("transformers")


def tiny_deepseek() -> torch.nn.Module:
    config = transformers.DeepseekV2Config(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=None,
        qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8, n_group=1, topk_group=1,
    )
    return transformers.DeepseekV2ForCausalLM(config)


def tiny_qwen2_moe() -> torch.nn.Module:
    config = transformers.Qwen2MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        shared_expert_intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2,
    )
    return transformers.Qwen2MoeForCausalLM(config)


@pytest.fixture(scope="module", params=["deepseek_v2", "qwen2_moe"])
def model(request: pytest.FixtureRequest) -> torch.nn.Module:
    torch.manual_seed(0)
    m = tiny_deepseek() if request.param == "deepseek_v2" else tiny_qwen2_moe()
    with torch.no_grad():
        for p in m.parameters():  # transformers may leave some weights at exact zeros/ones
            p.copy_(torch.randn_like(p))
    return m.eval()


def expert_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    return [k.removesuffix(".gate_up_proj") for k in state if k.endswith("experts.gate_up_proj")]


def check_against(source: SafetensorsSource, state: dict[str, torch.Tensor]) -> None:
    """Every state-dict tensor and every split expert stack loads exactly, with matching info."""
    for name, expected in state.items():
        assert source.has(name), name
        got = source.load(name)
        assert got.dtype == expected.dtype and torch.equal(got, expected), name
        info = source.info(name)
        assert info.shape == tuple(expected.shape)
        assert info.storage == str(expected.dtype).removeprefix("torch.")
        assert info.nbytes == expected.numel() * expected.element_size()
    prefixes = expert_prefixes(state)
    assert prefixes
    for prefix in prefixes:
        gate, up = state[f"{prefix}.gate_up_proj"].chunk(2, dim=1)
        assert torch.equal(source.load(f"{prefix}.gate_proj"), gate)
        assert torch.equal(source.load(f"{prefix}.up_proj"), up)
        assert source.info(f"{prefix}.up_proj").shape == tuple(up.shape)
        assert set(source.names()) >= {f"{prefix}.{p}" for p in ("gate_proj", "up_proj", "down_proj", "gate_up_proj")}


def test_save_pretrained_single_file(model: torch.nn.Module, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True)
    state = model.state_dict()
    source = SafetensorsSource(tmp_path)
    assert isinstance(source, WeightSource)
    check_against(source, state)
    # transformers 5 writes experts one by one; those names are served too.
    prefix = expert_prefixes(state)[0]
    assert source.has(f"{prefix}.0.gate_proj.weight")
    assert not source.is_virtual(f"{prefix}.0.gate_proj.weight") and source.is_virtual(f"{prefix}.gate_up_proj")
    assert torch.equal(source.load(f"{prefix}.3.down_proj.weight"), state[f"{prefix}.down_proj"][3])
    assert SafetensorsSource(tmp_path / "model.safetensors").has(f"{prefix}.gate_up_proj")


def test_save_pretrained_sharded_is_lazy(model: torch.nn.Module, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1
    source = SafetensorsSource(tmp_path)
    assert not source._handles  # nothing opened before a tensor is asked for
    name = next(iter(index["weight_map"]))
    source.load(name)
    assert len(source._handles) == 1
    check_against(source, model.state_dict())
    assert SafetensorsSource(tmp_path / "model.safetensors.index.json").has(name)


def test_stacked_checkpoint(model: torch.nn.Module, tmp_path: Path) -> None:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    check_against(source, state)
    prefix = expert_prefixes(state)[0]
    assert not source.is_virtual(f"{prefix}.gate_up_proj") and source.is_virtual(f"{prefix}.gate_proj")


def test_split_stacked_checkpoint(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    gate, up, down = torch.randn(4, 6, 8, generator=g), torch.randn(4, 6, 8, generator=g), torch.randn(4, 8, 6, generator=g)
    p = "model.layers.0.mlp.experts"
    save_file({f"{p}.gate_proj": gate, f"{p}.up_proj": up, f"{p}.down_proj": down}, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    assert torch.equal(source.load(f"{p}.gate_up_proj"), torch.cat([gate, up], dim=1))
    assert source.info(f"{p}.gate_up_proj").shape == (4, 12, 8)


def per_expert_state(dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    state = {}
    for layer in (1, 2):
        for e in range(3):
            p = f"model.layers.{layer}.mlp.experts.{e}"
            state[f"{p}.gate_proj.weight"] = torch.randn(6, 8, generator=g).to(dtype)
            state[f"{p}.up_proj.weight"] = torch.randn(6, 8, generator=g).to(dtype)
            state[f"{p}.down_proj.weight"] = torch.randn(8, 6, generator=g).to(dtype)
    state["model.norm.weight"] = torch.randn(8, generator=g).to(dtype)
    return state


def test_hand_written_per_expert_checkpoint(tmp_path: Path) -> None:
    state = per_expert_state()
    save_file(state, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp.experts"
        gates = torch.stack([state[f"{p}.{e}.gate_proj.weight"] for e in range(3)])
        ups = torch.stack([state[f"{p}.{e}.up_proj.weight"] for e in range(3)])
        downs = torch.stack([state[f"{p}.{e}.down_proj.weight"] for e in range(3)])
        assert torch.equal(source.load(f"{p}.gate_proj"), gates)
        assert torch.equal(source.load(f"{p}.up_proj"), ups)
        assert torch.equal(source.load(f"{p}.down_proj"), downs)
        gate_up = source.load(f"{p}.gate_up_proj", dtype=torch.float32)
        assert gate_up.dtype == torch.float32 and torch.equal(gate_up, torch.cat([gates, ups], dim=1).float())
        info = source.info(f"{p}.gate_up_proj")
        assert (info.shape, info.storage, info.nbytes) == ((3, 12, 8), "bfloat16", 3 * 12 * 8 * 2)
        raw = source.raw(f"{p}.down_proj")
        assert raw.ggml_type == "BF16" and raw.shape == (3, 8, 6)
        assert raw.data.tobytes() == downs.view(torch.uint8).numpy().tobytes()


def test_raw_and_copies(tmp_path: Path) -> None:
    state = per_expert_state(torch.float16)
    save_file(state, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    raw = source.raw("model.norm.weight")
    assert raw.ggml_type == "F16" and raw.shape == (8,) and not raw.data.flags.writeable
    assert raw.data.tobytes() == state["model.norm.weight"].numpy().tobytes()
    loaded = source.load("model.norm.weight")
    loaded.add_(1)  # a load is the caller's own copy
    assert torch.equal(source.load("model.norm.weight"), state["model.norm.weight"])
    save_file({"x": torch.arange(4)}, tmp_path / "ints.safetensors")
    with pytest.raises(SafetensorsFormatError, match="int64"):
        SafetensorsSource(tmp_path / "ints.safetensors").raw("x")


def test_incomplete_experts(tmp_path: Path) -> None:
    state = per_expert_state()
    del state["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    source = SafetensorsSource(tmp_path)
    p = "model.layers.1.mlp.experts"
    assert source.has(f"{p}.gate_proj") and source.has(f"{p}.down_proj")
    assert not source.has(f"{p}.up_proj") and not source.has(f"{p}.gate_up_proj")
    with pytest.raises(SafetensorsFormatError, match=r"up_proj for expert\(s\) 2"):
        source.load(f"{p}.gate_up_proj")
    with pytest.raises(MissingTensorError):
        source.load("model.layers.9.mlp.experts.gate_proj")


def test_mismatched_expert_shapes(tmp_path: Path) -> None:
    state = per_expert_state()
    state["model.layers.1.mlp.experts.1.gate_proj.weight"] = torch.zeros(5, 8, dtype=torch.bfloat16)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(SafetensorsFormatError, match="expert 1"):
        SafetensorsSource(tmp_path).load("model.layers.1.mlp.experts.gate_proj")


def test_bad_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(KtUserError, match="does not exist"):
        SafetensorsSource(tmp_path / "none")
    with pytest.raises(KtUserError, match="no safetensors"):
        SafetensorsSource(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(SafetensorsFormatError, match="model.safetensors"):
        SafetensorsSource(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file({"a": torch.zeros(2)}, tmp_path / "a.safetensors")
    save_file({"b": torch.zeros(2)}, tmp_path / "b.safetensors")
    with pytest.raises(KtUserError, match="several safetensors files"):
        SafetensorsSource(tmp_path)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "c": "c.safetensors"}}))
    with pytest.raises(SafetensorsFormatError, match="c.safetensors"):
        SafetensorsSource(tmp_path)
    index.write_text(json.dumps({"weight_map": {"a": "a.safetensors", "b": "a.safetensors"}}))
    source = SafetensorsSource(tmp_path)
    assert torch.equal(source.load("a"), torch.zeros(2))
    with pytest.raises(SafetensorsFormatError, match="does not contain"):
        source.load("b")
    index.write_text("[1, 2]")
    with pytest.raises(SafetensorsFormatError, match="weight_map"):
        SafetensorsSource(tmp_path)


def test_fp8_block_scaled_weights_are_dequantized(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    state, expected = {}, {}
    for e in range(2):
        for proj, shape in (("gate_proj", (6, 8)), ("up_proj", (6, 8)), ("down_proj", (8, 6))):
            name = f"model.layers.1.mlp.experts.{e}.{proj}.weight"
            weight = torch.randn(*shape, generator=g).to(torch.float8_e4m3fn)
            scale = torch.rand(-(-shape[0] // 4), -(-shape[1] // 4), generator=g) + 0.5  # 4x4 blocks
            state[name], state[f"{name}_scale_inv"] = weight, scale
            full = scale.repeat_interleave(4, 0)[: shape[0]].repeat_interleave(4, 1)[:, : shape[1]]
            expected[name] = weight.float() * full
    save_file(state, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": {"weight_block_size": [4, 4]}}))
    source = SafetensorsSource(tmp_path)
    name = "model.layers.1.mlp.experts.1.down_proj.weight"
    assert source.info(name).storage == "float8_e4m3fn"
    loaded = source.load(name)
    assert loaded.dtype == torch.bfloat16
    torch.testing.assert_close(source.load(name, dtype=torch.float32), expected[name])
    gate_up = source.load("model.layers.1.mlp.experts.gate_up_proj", dtype=torch.float32)
    p = "model.layers.1.mlp.experts"
    torch.testing.assert_close(
        gate_up, torch.stack([torch.cat([expected[f"{p}.{e}.gate_proj.weight"], expected[f"{p}.{e}.up_proj.weight"]]) for e in range(2)])
    )
    assert source.load(f"{p}.down_proj").dtype == torch.bfloat16
    with pytest.raises(SafetensorsFormatError, match="float8_e4m3fn"):
        source.raw(name)
    with pytest.raises(SafetensorsFormatError, match="float8_e4m3fn"):
        source.raw(f"{p}.down_proj")
    with pytest.raises(SafetensorsFormatError, match="128×128"):
        SafetensorsSource(tmp_path / "model.safetensors", fp8_block_size=(128, 128)).load(name)
