"""`kt convert`: tiny random models → GGUF → read back through kt and through gguf-py.

F32 files must give back the exact weights. Quantized files are bounded by the formats'
own error (the per-type bounds are established in test_quantize.py; here the check is
that the converter picks types as llama.cpp does and that values come back close).
"""

from __future__ import annotations

import gguf
import pytest
import torch
from tiny_models import deepseek_v2_config, deepseek_v3_config, qwen2_moe_config, qwen3_moe_config, random_model

from kt_core.cli.main import main
from kt_core.convert import FILE_TYPES
from kt_core.demo.tokenizer import build_demo_tokenizer
from kt_core.plugins import get_registry
from kt_core.runtime.model_source import open_model

CONFIGS = {
    "deepseek-v2": deepseek_v2_config,
    "deepseek-v2-lite": lambda **kw: deepseek_v2_config(q_lora_rank=None, **kw),
    "deepseek-v3": deepseek_v3_config,
    "qwen2-moe": qwen2_moe_config,
    "qwen3-moe": qwen3_moe_config,
}


def saved(kind: str, tmp_path, **overrides):
    tokenizer = build_demo_tokenizer()
    model = random_model(CONFIGS[kind](vocab_size=len(tokenizer), **overrides))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    return model, tokenizer


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_f32_round_trip_is_exact(kind, tmp_path):
    model, tokenizer = saved(kind, tmp_path)
    out = tmp_path / "m.gguf"
    assert main(["convert", str(tmp_path), str(out), "--type", "F32"]) == 0
    inputs = open_model(None, str(out), get_registry())
    for name, tensor in model.state_dict().items():
        assert torch.equal(inputs.source.load(name, dtype=torch.float32), tensor), name
    assert inputs.tokenizer.encode("route every token") == tokenizer.encode("route every token")


def test_quantized_types_follow_llama_cpp_conventions(tmp_path):
    # hidden 256 so rows divide into K-quant super-blocks; moe_intermediate 96 does not (falls back).
    model, _ = saved("deepseek-v2-lite", tmp_path, hidden_size=256, moe_intermediate_size=96, intermediate_size=512)
    out = tmp_path / "q4k.gguf"
    assert main(["convert", str(tmp_path), str(out), "--type", "Q4_K"]) == 0
    reader = gguf.GGUFReader(out)  # the independent reader
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_gate_exps.weight"] == "Q4_K"  # rows of 256
    assert types["blk.1.ffn_down_exps.weight"] == "Q8_0"  # rows of 96: K-quant impossible, 32-blocks fit
    assert types["blk.1.attn_norm.weight"] == "F32"
    assert types["blk.1.ffn_gate_inp.weight"] == "F32"  # the router stays F32, as in llama.cpp
    fields = {f.name for f in reader.fields.values()}
    assert {"general.architecture", "deepseek2.block_count", "deepseek2.expert_count", "tokenizer.ggml.tokens",
            "general.file_type", "general.quantization_version"} <= fields
    source = open_model(None, str(out), get_registry()).source
    for name, tensor in model.state_dict().items():
        got = source.load(name, dtype=torch.float32)
        rel = (got - tensor).norm() / tensor.norm()
        assert rel < 0.12, (name, float(rel))  # Q4_K on gaussian weights: ~7-8% relative RMS


@pytest.mark.parametrize("requested", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "IQ4_NL", "Q4_0"])
def test_type_fallback_for_rows_the_requested_blocks_do_not_divide(requested):
    from kt_core.convert import choose_type

    assert choose_type((8, 512), requested, keep_f32=False) == requested
    # 256-value super-blocks (K-quants, IQ4_XS) need rows of 256; 96 takes Q8_0's 32-blocks,
    # which 32-value types (IQ4_NL, Q4_0) fit as they are.
    assert choose_type((8, 96), requested, keep_f32=False) == (requested if requested in ("IQ4_NL", "Q4_0") else "Q8_0")
    assert choose_type((8, 24), requested, keep_f32=False) == "F16"
    assert choose_type((8, 512), requested, keep_f32=True) == "F32"
    assert choose_type((512,), requested, keep_f32=False) == "F32"


def test_refuses_to_overwrite_without_force(tmp_path, capsys):
    saved("qwen3-moe", tmp_path)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["convert", str(tmp_path), str(out), "--type", "F16"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"keep me"
    assert main(["convert", str(tmp_path), str(out), "--type", "F16", "--force"]) == 0
    assert out.stat().st_size > 1000


def test_not_a_model_directory(tmp_path, capsys):
    assert main(["convert", str(tmp_path / "nope"), str(tmp_path / "x.gguf")]) == 2
    assert "not a directory" in capsys.readouterr().err


# Relative RMS error bounds of a read-back tensor, by the GGML type it is stored as. They
# are test_quantize.py's GAUSSIAN_BOUND (derived there from each format's step size, and
# measured on 64k gaussian values) plus 25% headroom: here a tensor may hold as few as 8k
# values (32 K-quant super-blocks), so its error estimate varies more. Weights of
# `random_model` are gaussian, as those bounds assume.
READ_BACK_BOUND = {
    "F32": 0.0,
    "F16": 0.00025 * 1.25,
    "BF16": 0.0019 * 1.25,
    "Q8_0": 0.0060 * 1.25,
    "Q4_0": 0.095 * 1.25,
    "Q4_K": 0.077 * 1.25,
    "Q5_K": 0.038 * 1.25,
    "Q6_K": 0.0187 * 1.25,
    "Q2_K": 0.285 * 1.25,
    "Q3_K": 0.151 * 1.25,
    "IQ4_NL": 0.078 * 1.25,
    "IQ4_XS": 0.078 * 1.25,
}


@pytest.fixture(scope="module")
def k_quant_sized(tmp_path_factory):
    """A DeepSeek-V2-Lite whose rows of 256 take K-quants and rows of 96/16 fall back."""
    folder = tmp_path_factory.mktemp("k-quant-sized")
    model, _ = saved("deepseek-v2-lite", folder, hidden_size=256, moe_intermediate_size=96, intermediate_size=512)
    return folder, model


def test_every_convert_type_has_a_read_back_bound():
    assert set(FILE_TYPES) <= set(READ_BACK_BOUND)


@pytest.mark.parametrize("ggml_type", list(FILE_TYPES))
def test_converted_file_decodes_like_gguf_py_within_the_types_bound(ggml_type, k_quant_sized, tmp_path):
    """Every tensor of a `kt convert` output, decoded by kt, equals gguf-py's decoding bit
    for bit (through gguf-py's own reader, independent of ours), and the weights read back
    by name are within the bound of the type each is stored as."""
    from kt_core.quant.dequantize import dequantize
    from kt_core.weights.gguf_file import open_gguf

    folder, model = k_quant_sized
    out = tmp_path / f"m-{ggml_type}.gguf"
    assert main(["convert", str(folder), str(out), "--type", ggml_type]) == 0

    reader = gguf.GGUFReader(out)
    stored_types = {t.tensor_type.name for t in reader.tensors}
    assert ggml_type in stored_types
    with open_gguf(out) as ours:
        for theirs in reader.tensors:
            tensor = ours.tensors[theirs.name]
            expected = gguf.quants.dequantize(theirs.data, theirs.tensor_type).astype("float32")
            got = dequantize(tensor.data, tensor.ggml_type, tensor.shape)
            assert torch.equal(got, torch.from_numpy(expected.reshape(tensor.shape))), theirs.name

    source = open_model(None, str(out), get_registry()).source
    for name, tensor in model.state_dict().items():
        types = {t.ggml_type for t in source.gguf_tensors(name)}
        bound = max(READ_BACK_BOUND[t] for t in types)
        got = source.load(name, dtype=torch.float32)
        rel = float((got - tensor).norm() / tensor.norm())
        assert rel <= bound, (name, sorted(types), rel)


def test_writing_shows_a_progress_bar(tmp_path, capsys):
    from kt_core.convert import write_gguf

    saved("qwen3-moe", tmp_path)
    inputs = open_model(str(tmp_path), None, get_registry())
    capsys.readouterr()
    planned = write_gguf(tmp_path / "m.gguf", inputs.source, inputs.config, get_registry(), ggml_type="Q8_0",
                         show_progress=True)
    err = capsys.readouterr().err
    # tqdm draws its first frame at once and clears the bar at the end (leave=False).
    assert "writing m.gguf" in err and f"0/{len(planned)}" in err
