"""`GGUFSource`: GGUF names, name-mapped transformers names, dequantization, raw bytes."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from kt_core.weights.gguf_file import GGUFFile, open_gguf
from kt_core.weights.gguf_source import (
    GGUFSource,
    RawUnavailableError,
    UnsupportedTypeError,
    supported_types,
    unsupported_tensors,
)
from kt_core.weights.name_map import NameMap, TensorMapping
from kt_core.weights.source import MissingTensorError, WeightSource

Q = gguf.GGMLQuantizationType
E, F, H = 3, 4, 8  # experts, expert (ffn) intermediate size, hidden size


def write_gguf(path: Path, tensors: dict[str, np.ndarray], raw_types: dict[str, Q] | None = None) -> Path:
    writer = gguf.GGUFWriter(str(path), "qwen2moe")
    for name, array in tensors.items():
        writer.add_tensor(name, array, raw_dtype=(raw_types or {}).get(name))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def bf16_bytes(t: torch.Tensor) -> np.ndarray:
    """A bfloat16 tensor as the uint8 array GGUFWriter takes for raw BF16 data."""
    return t.to(torch.bfloat16).contiguous().view(torch.uint8).numpy()


@pytest.fixture
def reference() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "gate": torch.randn(E, F, H, generator=g),
        "up": torch.randn(E, F, H, generator=g),
        "down": torch.randn(E, H, F, generator=g),
        "norm": torch.randn(H, generator=g),
        "embd": torch.randn(10, H, generator=g).to(torch.bfloat16),
        "k_b": torch.randn(2, 5, 6, generator=g),
    }


@pytest.fixture
def gguf_file(tmp_path: Path, reference: dict[str, torch.Tensor]) -> GGUFFile:
    r = reference
    path = write_gguf(
        tmp_path / "model.gguf",
        {
            "token_embd.weight": bf16_bytes(r["embd"]),
            "blk.0.attn_norm.weight": r["norm"].numpy(),
            "blk.0.ffn_gate_exps.weight": r["gate"].numpy(),
            "blk.0.ffn_up_exps.weight": r["up"].to(torch.float16).numpy(),
            "blk.0.ffn_down_exps.weight": r["down"].numpy(),
            "blk.0.attn_k_b.weight": r["k_b"].numpy(),
        },
        raw_types={"token_embd.weight": Q.BF16},
    )
    f = open_gguf(path)
    yield f
    f.close()


def _cat_gate_up(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    gate, up = tensors
    return torch.cat([gate, up.to(gate.dtype)], dim=1)


def _split_gate_up(t: torch.Tensor) -> list[torch.Tensor]:
    return list(t.chunk(2, dim=1))


def _k_b_to_hf(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    (k_b,) = tensors
    return k_b.transpose(1, 2).reshape(-1, k_b.shape[1])


def name_map() -> NameMap:
    m = NameMap()
    m.add(TensorMapping("model.embed_tokens.weight", ("token_embd.weight",)))
    m.add(TensorMapping("model.layers.0.input_layernorm.weight", ("blk.0.attn_norm.weight",), keep_f32=True))
    prefix = "model.layers.0.mlp.experts"
    m.add(TensorMapping(f"{prefix}.gate_proj", ("blk.0.ffn_gate_exps.weight",)))
    m.add(TensorMapping(f"{prefix}.up_proj", ("blk.0.ffn_up_exps.weight",)))
    m.add(TensorMapping(f"{prefix}.down_proj", ("blk.0.ffn_down_exps.weight",)))
    m.add(
        TensorMapping(
            f"{prefix}.gate_up_proj",
            ("blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"),
            to_hf=_cat_gate_up,
            to_gguf=_split_gate_up,
        )
    )
    m.add(TensorMapping("model.layers.0.self_attn.k.weight", ("blk.0.attn_k_b.weight",), to_hf=_k_b_to_hf))
    m.add(TensorMapping("model.layers.1.mlp.experts.gate_proj", ("blk.1.ffn_gate_exps.weight",)))
    return m


def test_is_a_weight_source(gguf_file: GGUFFile) -> None:
    assert isinstance(GGUFSource(gguf_file), WeightSource)
    assert isinstance(GGUFSource(gguf_file, name_map()), WeightSource)


def test_gguf_names_without_name_map(gguf_file: GGUFFile, reference: dict[str, torch.Tensor]) -> None:
    source = GGUFSource(gguf_file)
    assert list(source.names()) == list(gguf_file.tensors)
    assert source.description == str(gguf_file.path)
    gate = source.load("blk.0.ffn_gate_exps.weight")
    assert gate.dtype == torch.float32 and torch.equal(gate, reference["gate"])
    up = source.load("blk.0.ffn_up_exps.weight")
    assert up.dtype == torch.float16 and torch.equal(up, reference["up"].to(torch.float16))
    embd = source.load("token_embd.weight")
    assert embd.dtype == torch.bfloat16 and torch.equal(embd, reference["embd"])
    assert torch.equal(source.load("token_embd.weight", dtype=torch.float32), reference["embd"].float())
    assert source.info("token_embd.weight").storage == "BF16"
    assert source.info("blk.0.ffn_down_exps.weight").shape == (E, H, F)
    with pytest.raises(MissingTensorError):
        source.load("model.embed_tokens.weight")


def test_loaded_tensors_are_independent_copies(gguf_file: GGUFFile, reference: dict[str, torch.Tensor]) -> None:
    source = GGUFSource(gguf_file)
    t = source.load("blk.0.attn_norm.weight")
    t.add_(1)  # must not touch the (read-only) map or later loads
    assert torch.equal(source.load("blk.0.attn_norm.weight"), reference["norm"])


def test_name_mapped_loading(gguf_file: GGUFFile, reference: dict[str, torch.Tensor]) -> None:
    source = GGUFSource(gguf_file, name_map())
    prefix = "model.layers.0.mlp.experts"
    assert set(source.names()) == {m.hf_name for m in name_map()} - {"model.layers.1.mlp.experts.gate_proj"}
    assert torch.equal(source.load(f"{prefix}.gate_proj"), reference["gate"])
    gate_up = source.load(f"{prefix}.gate_up_proj", dtype=torch.float32)
    expected = torch.cat([reference["gate"], reference["up"].to(torch.float16).float()], dim=1)
    assert gate_up.shape == (E, 2 * F, H) and torch.equal(gate_up, expected)
    # Without a dtype, mixed storage types dequantize to float32.
    assert source.load(f"{prefix}.gate_up_proj").dtype == torch.float32
    k = source.load("model.layers.0.self_attn.k.weight")
    assert torch.equal(k, _k_b_to_hf([reference["k_b"]]))
    assert source.load(f"{prefix}.down_proj", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_name_mapped_info_without_reading(gguf_file: GGUFFile) -> None:
    source = GGUFSource(gguf_file, name_map())
    prefix = "model.layers.0.mlp.experts"
    info = source.info(f"{prefix}.gate_up_proj")
    assert info.shape == (E, 2 * F, H)
    assert info.storage == "F32+F16"
    assert info.nbytes == E * F * H * 4 + E * F * H * 2
    assert source.info("model.layers.0.self_attn.k.weight").shape == (12, 5)
    assert source.info(f"{prefix}.gate_proj").storage == "F32"


def test_info_falls_back_when_transform_needs_values(gguf_file: GGUFFile) -> None:
    def by_value(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        (t,) = tensors
        return torch.from_numpy(t.numpy()[:, :2].copy())  # numpy: impossible on meta tensors

    m = NameMap()
    m.add(TensorMapping("x", ("blk.0.attn_k_b.weight",), to_hf=by_value))
    assert GGUFSource(gguf_file, m).info("x").shape == (2, 2, 6)


def test_missing_mapped_tensor(gguf_file: GGUFFile) -> None:
    source = GGUFSource(gguf_file, name_map())
    name = "model.layers.1.mlp.experts.gate_proj"
    assert not source.has(name)
    assert source.has("model.layers.0.mlp.experts.gate_proj")
    with pytest.raises(MissingTensorError, match="blk.1.ffn_gate_exps.weight"):
        source.load(name)
    with pytest.raises(MissingTensorError):
        source.info("model.not.there")


def test_raw_bytes(gguf_file: GGUFFile, reference: dict[str, torch.Tensor]) -> None:
    source = GGUFSource(gguf_file, name_map())
    raw = source.raw("model.embed_tokens.weight")
    assert raw.ggml_type == "BF16" and raw.shape == (10, H) and raw.name == "model.embed_tokens.weight"
    assert raw.data.tobytes() == bf16_bytes(reference["embd"]).tobytes()
    assert np.shares_memory(raw.data, gguf_file.tensors["token_embd.weight"].data)
    with pytest.raises(RawUnavailableError, match="gate_up_proj"):
        source.raw("model.layers.0.mlp.experts.gate_up_proj")


@pytest.fixture
def quantized(tmp_path: Path) -> tuple[GGUFFile, np.ndarray]:
    pytest.importorskip("kt_core.quant.dequantize")
    rng = np.random.default_rng(1)
    values = rng.standard_normal((4, 64)).astype(np.float32)
    blocks = gguf.quants.quantize(values, Q.Q8_0)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.ffn_down_exps.weight": blocks}, {"blk.0.ffn_down_exps.weight": Q.Q8_0})
    f = open_gguf(path)
    yield f, gguf.quants.dequantize(blocks, Q.Q8_0)
    f.close()


def test_quantized_load_goes_through_dequantize(quantized: tuple[GGUFFile, np.ndarray]) -> None:
    f, expected = quantized
    source = GGUFSource(f)
    out = source.load("blk.0.ffn_down_exps.weight")
    assert out.dtype == torch.float32 and out.shape == (4, 64)
    torch.testing.assert_close(out, torch.from_numpy(expected))
    assert source.load("blk.0.ffn_down_exps.weight", dtype=torch.bfloat16).dtype == torch.bfloat16
    raw = source.raw("blk.0.ffn_down_exps.weight")
    assert raw.ggml_type == "Q8_0" and raw.shape == (4, 64) and raw.data.nbytes == 4 * 2 * 34
    assert unsupported_tensors(source) == []


def test_unsupported_tensors(tmp_path: Path) -> None:
    pytest.importorskip("kt_core.quant.dequantize")
    supported = supported_types()
    missing = [t for t in Q if t.name not in supported and t in gguf.GGML_QUANT_SIZES]
    if not missing:
        pytest.skip("dequantize supports every GGML type")
    qtype = missing[0]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    blob = np.zeros((2, size), dtype=np.uint8)  # two rows of one block each
    path = write_gguf(
        tmp_path / "u.gguf",
        {"blk.0.odd.weight": blob, "blk.0.attn_norm.weight": np.ones(8, np.float32)},
        {"blk.0.odd.weight": qtype},
    )
    with open_gguf(path) as f:
        assert f.tensors["blk.0.odd.weight"].shape == (2, block)
        assert unsupported_tensors(GGUFSource(f)) == [("blk.0.odd.weight", qtype.name)]
        m = NameMap()
        m.add(TensorMapping("model.odd", ("blk.0.odd.weight",)))
        m.add(TensorMapping("model.norm", ("blk.0.attn_norm.weight",)))
        assert unsupported_tensors(GGUFSource(f, m)) == [("model.odd", qtype.name)]
        with pytest.raises(UnsupportedTypeError, match=f"'blk.0.odd.weight'.*{qtype.name}"):
            GGUFSource(f, m).load("model.odd")
        assert GGUFSource(f, m).raw("model.odd").ggml_type == qtype.name  # raw bytes still readable
