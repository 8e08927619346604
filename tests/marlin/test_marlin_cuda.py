"""The CUDA path on a real GPU (skipped without CUDA or triton): the Triton kernel compiled,
the backends on ``cuda`` against the CPU path and the PyTorch backends on the same int4
weights, and a Marlin rule file end to end on the GPU.

Tolerances as in the interpreter test: float32 accumulation on both sides; 16-bit outputs
differ by their final rounding (half an ulp: rtol 2^-8 bf16, 2^-10 fp16). Comparing the
GPU with the CPU path in bfloat16 allows one ulp (rtol 2^-7): each side rounds its own
float32 sum.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tiny_models import deepseek_v2_config, qwen3_moe_config, random_model
from torch import nn

from kt_core.weights.source import StateDictSource
from kt_ops_marlin.int4 import quantize_int4
from kt_ops_marlin.packing import pack_int4

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="the CUDA path needs triton"),
]

TOL = {torch.float32: dict(rtol=0, atol=1e-4), torch.bfloat16: dict(rtol=2**-8, atol=1e-3),
       torch.float16: dict(rtol=2**-10, atol=1e-3)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize(("m", "n", "k", "group_size"), [
    (1, 4096, 4096, 128), (4, 1000, 1024, 64), (16, 512, 2048, -1), (33, 256, 1408, 128), (64, 384, 768, 96),
])
def test_triton_kernel_on_cuda(dtype, m, n, k, group_size):
    from kt_ops_marlin.triton_kernel import int4_matmul_triton

    gen = torch.Generator().manual_seed(m + n + k)
    qw = quantize_int4((torch.randn(n, k, generator=gen) * 0.05).cuda(), group_size, dtype)
    x = torch.randn(m, k, generator=gen).to("cuda", dtype)
    got = int4_matmul_triton(x, pack_int4(qw.q), qw.scales.t().contiguous(), qw.group_size)
    expected = (x.double() @ qw.dequantize(torch.float64).t()).float()
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), expected, **TOL[dtype])


def test_linear_on_cuda_matches_the_cpu_path():
    from kt_ops_marlin.linear import KLinearMarlin

    torch.manual_seed(0)
    ref = nn.Linear(1024, 768)
    state = {f"l.{k}": v.detach() for k, v in ref.state_dict().items()}
    ops = {}
    for device in ("cuda", "cpu"):
        ops[device] = KLinearMarlin("l", StateDictSource(state), deepseek_v2_config(), ref, device=device,
                                    group_size=128, dtype="bfloat16")
        ops[device].load()
    assert ops["cuda"].int4.qweight.is_cuda
    x = torch.randn(5, 1024)
    torch.testing.assert_close(ops["cuda"](x.cuda()).cpu(), ops["cpu"](x), rtol=2**-7, atol=1e-2)


@pytest.mark.parametrize("make_config", [deepseek_v2_config, qwen3_moe_config])
def test_experts_on_cuda_match_torch_experts_on_int4_weights(make_config):
    from kt_ops_marlin.experts import KExpertsMarlin
    from kt_ops_torch.experts import KExpertsTorch

    config = make_config()
    experts = random_model(config).model.layers[1].mlp.experts
    state = {f"e.{k}": v.detach() for k, v in experts.state_dict().items()}
    dequantized = {k: quantize_int4(v, 32).dequantize() for k, v in state.items()}
    marlin = KExpertsMarlin("e", StateDictSource(state), config, experts, device="cuda", group_size=32, dtype="float32")
    torch_op = KExpertsTorch("e", StateDictSource(dequantized), config, experts, dtype="float32")
    marlin.load()
    torch_op.load()
    hidden = torch.randn(9, config.hidden_size)
    ids = torch.stack([torch.randperm(experts.num_experts)[: config.num_experts_per_tok] for _ in range(9)])
    weights = torch.rand(9, config.num_experts_per_tok)
    got = marlin(hidden.cuda(), ids.cuda(), weights.cuda()).cpu()
    torch.testing.assert_close(got, torch_op(hidden, ids, weights), rtol=0, atol=1e-5)


def test_gpu_rule_file_on_the_gpu_gives_the_cpu_tokens(tmp_path, capsys):
    """The tiny DeepSeek variant of the Marlin rules on cuda vs the same rules remapped to the CPU (float32)."""
    import json

    from marlin_e2e import CASES, PROMPT, save_model_dir, tiny_rules

    from kt_core.cli.main import main
    from kt_core.demo.tokenizer import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    make_config, rules_name, substitutions = CASES["deepseek-v2-lite"]
    model_dir = save_model_dir(random_model(make_config(vocab_size=len(tokenizer)), seed=1), tokenizer, tmp_path / "model")
    rules = tiny_rules(rules_name, substitutions, tmp_path / "marlin.yaml")
    base = ["generate", "--model", str(model_dir), "--rules", str(rules), "--prompt", PROMPT, "--max-new-tokens", "16",
            "--dtype", "float32", "--json"]
    assert main(base) == 0
    gpu = json.loads(capsys.readouterr().out)["tokens"]
    assert main([*base, "--device-map", "cuda=cpu"]) == 0
    assert gpu == json.loads(capsys.readouterr().out)["tokens"]
