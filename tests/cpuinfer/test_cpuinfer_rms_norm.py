"""`KRMSNormCPUInfer` against the transformers RMSNorm modules it replaces.

The engine reproduces the module's roundings (float32 normalization, cast to the input's
dtype, product with the weight in the promoted dtype) but sums the squares in another
order than torch's mean. So: bfloat16 results may differ only where that last-bit
difference in the float32 value moves it across a bfloat16 rounding boundary, which is
rare (at most a few of thousands of values, each by one bfloat16 step); float32 results
agree within 4 float32 ulps of the values (2e-6 relative, plus the weight's product).
"""

from __future__ import annotations

import pytest
import torch
from cpuinfer_refs import ISAS
from torch import nn
from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeRMSNorm

from kt_core.weights.source import StateDictSource
from kt_ops_cpuinfer import use_isa
from kt_ops_cpuinfer.rms_norm import KRMSNormCPUInfer

KEY = "model.layers.0.input_layernorm"
HIDDEN = 2051  # not a multiple of 8: the vector loop's tail runs too


def _pair(cls: type[nn.Module], dtype: torch.dtype, isa: str, eps: float = 1e-6) -> tuple[nn.Module, KRMSNormCPUInfer]:
    weight = torch.randn(HIDDEN, generator=torch.Generator().manual_seed(1)).to(dtype)
    reference = cls(HIDDEN, eps=eps).to(dtype)
    reference.weight.data.copy_(weight)
    with use_isa(isa):
        op = KRMSNormCPUInfer(KEY, StateDictSource({f"{KEY}.weight": weight}), None, cls(HIDDEN, eps=eps).to(dtype).to("meta"))
        op.load()
    return reference, op


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("cls", [DeepseekV2RMSNorm, Qwen3MoeRMSNorm])
def test_bfloat16_matches_the_module(isa, cls):
    reference, op = _pair(cls, torch.bfloat16, isa)
    x = (torch.randn(3, 7, HIDDEN, generator=torch.Generator().manual_seed(2)) * 4).to(torch.bfloat16)
    out = op(x)
    with torch.no_grad():
        expected = reference(x)
    assert out.dtype == expected.dtype == torch.bfloat16 and out.shape == x.shape
    differ = out != expected
    assert int(differ.sum()) <= 5, f"{int(differ.sum())} of {out.numel()} values differ"
    if differ.any():  # a boundary case: one bfloat16 step apart
        step = expected.float().abs() * 2**-7
        assert torch.all((out.float() - expected.float()).abs()[differ] <= step[differ] * 1.01)


@pytest.mark.parametrize("isa", ISAS)
def test_float32_matches_within_float32_rounding(isa):
    reference, op = _pair(DeepseekV2RMSNorm, torch.float32, isa, eps=1e-5)
    x = torch.randn(4, HIDDEN, generator=torch.Generator().manual_seed(3)) * 10
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(op(x), expected, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("isa", ISAS)
def test_output_dtype_is_the_promoted_one(isa):
    # A float32 weight with bfloat16 activations gives float32, as `weight * h.to(input_dtype)` does.
    reference, op = _pair(DeepseekV2RMSNorm, torch.float32, isa)
    x = torch.randn(2, HIDDEN, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16)
    with torch.no_grad():
        expected = reference(x)
    out = op(x)
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-7)


def test_non_contiguous_input_is_read_as_its_values():
    reference, op = _pair(DeepseekV2RMSNorm, torch.bfloat16, ISAS[0])
    x = torch.randn(HIDDEN, 6, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16).t()
    with torch.no_grad():
        expected = reference(x)
    assert int((op(x) != expected).sum()) <= 2


def test_refuses_other_norms_and_use_before_load():
    class GemmaLike(nn.Module):  # multiplies by 1 + weight: same attributes, another formula
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(8))
            self.variance_epsilon = 1e-6

    assert "GemmaLike is not one of them" in KRMSNormCPUInfer.accepts(GemmaLike())
    assert KRMSNormCPUInfer.accepts(DeepseekV2RMSNorm(8)) is None
    op = KRMSNormCPUInfer(KEY, StateDictSource({}), None, DeepseekV2RMSNorm(HIDDEN).to("meta"))
    with pytest.raises(RuntimeError, match="used before load"):
        op(torch.zeros(1, HIDDEN))
    with pytest.raises(ValueError, match="on the CPU|runs on the CPU"):
        KRMSNormCPUInfer(KEY, StateDictSource({}), None, DeepseekV2RMSNorm(HIDDEN).to("meta"), "cuda")


def test_wrong_input_is_reported_with_the_module():
    _, op = _pair(DeepseekV2RMSNorm, torch.bfloat16, ISAS[0])
    with pytest.raises(ValueError, match=f"{KEY}: input has 16 features, expected {HIDDEN}"):
        op(torch.zeros(1, 16, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="float32, bfloat16 or float16 CPU input"):
        op(torch.zeros(1, HIDDEN, dtype=torch.float64))
