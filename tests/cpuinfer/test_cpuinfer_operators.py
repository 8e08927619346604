"""Registration, kwargs, weight checks and `KLinearCPUInfer` of kt-ops-cpuinfer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cpuinfer_refs import ISAS, BlockSource, dequantize, make_blocks, matmul_bound, own_memory
from pydantic import ValidationError
from test_cpuinfer_moe import KEY, moe_config, moe_source
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory
from kt_core.registry import OperatorKind
from kt_core.weights.source import StateDictSource
from kt_ops_cpuinfer import ISA_ENV, _engine, current_isa, set_isa, supported_isas, use_isa
from kt_ops_cpuinfer.activation import UnsupportedActivationError
from kt_ops_cpuinfer.experts import KExpertsCPU
from kt_ops_cpuinfer.isa import UnsupportedISAError
from kt_ops_cpuinfer.linear import KLinearCPUInfer
from kt_ops_cpuinfer.weights import UnsupportedWeightTypeError


def test_operators_are_registered_with_their_aliases(registry):
    experts = registry.resolve_operator("KExpertsCPU", kind=OperatorKind.EXPERTS_BACKEND)
    assert registry.resolve_operator("ktransformers.operators.experts.KExpertsCPU") is experts
    assert registry.resolve_operator("MLPCPUExperts") is experts
    assert experts.devices == ("cpu",) and experts.load_class() is KExpertsCPU
    linear = registry.resolve_operator("ktransformers.operators.linear.KLinearCPUInfer", kind=OperatorKind.LINEAR_BACKEND)
    assert linear.name == "KLinearCPUInfer" and linear.load_class() is KLinearCPUInfer


def test_kwargs_are_validated(registry):
    model = registry.resolve_operator("KExpertsCPU").kwargs_model
    assert model(threads=4, backend="llamafile").threads == 4
    for bad in ({"threads": 0}, {"backend": "AMXInt8"}, {"thread": 2}):
        with pytest.raises(ValidationError):
            model(**bad)


def test_rule_file_with_cpu_experts_validates(rules_from):
    rules = rules_from("""
        - match:
            name: "^model\\\\.layers\\\\..*\\\\.mlp\\\\.experts$"
          replace:
            class: ktransformers.operators.experts.KTransformersExperts
            kwargs:
              generate_device: "cpu"
              generate_op: "KExpertsCPU"
              prefill_op: "KExpertsCPU"
              threads: 2
              backend: "llamafile"
          recursive: False
    """)
    assert len(rules.rules) == 1


def test_unsupported_type_is_reported_before_loading():
    E, H, inter = 4, 256, 32
    source, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=1)
    tensors = {name: source._get(name) for name in source.names()}
    ggml_type, shape, blocks = tensors[f"{KEY}.up_proj"]
    tensors[f"{KEY}.up_proj"] = ("Q3_K", shape, blocks)  # only the type is looked at
    backend = KExpertsCPU(KEY, BlockSource(tensors, "model.gguf"), moe_config(E, H, inter), None, "cpu")
    problems = backend.check_weights()
    assert len(problems) == 1
    assert f"{KEY}.up_proj in model.gguf is stored as Q3_K" in problems[0]
    assert "F32, F16, BF16, Q4_0, Q5_0, Q8_0, Q4_K, Q5_K, Q6_K" in problems[0]
    with pytest.raises(UnsupportedWeightTypeError, match="Q3_K"):
        backend.load()


def test_placement_and_activation_errors():
    E, H, inter = 4, 64, 32
    source, _ = moe_source(("Q8_0", "Q8_0", "Q8_0"), E, H, inter, seed=1)
    with pytest.raises(ValueError, match="runs on the CPU"):
        KExpertsCPU(KEY, source, moe_config(E, H, inter), None, "cuda:0")
    with pytest.raises(UnsupportedActivationError, match="no activation 'sigmoid'"):
        KExpertsCPU(KEY, source, moe_config(E, H, inter, act="sigmoid"), None, "cpu")


def test_isa_can_be_forced(monkeypatch):
    assert current_isa() == supported_isas()[0]
    monkeypatch.setenv(ISA_ENV, "avx2")
    assert current_isa() == "avx2"
    monkeypatch.setenv(ISA_ENV, "sse")
    with pytest.raises(UnsupportedISAError, match=r"\$KT_CPUINFER_ISA: unknown kernel path 'sse'"):
        current_isa()
    monkeypatch.delenv(ISA_ENV)
    with use_isa("avx2") as isa:
        assert isa == current_isa() == "avx2"
    assert current_isa() == supported_isas()[0]
    set_isa(None)


def _linear(weight_blocks: tuple[str, tuple[int, int], np.ndarray], bias: torch.Tensor | None, isa: str):
    ggml_type, (out_f, in_f), blocks = weight_blocks
    tensors = {"lm_head.weight": weight_blocks}
    if bias is not None:
        tensors["lm_head.bias"] = ("F32", (out_f,), bias.numpy().view(np.uint8).reshape(out_f, 4))
    module = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    with use_isa(isa):
        backend = KLinearCPUInfer("lm_head", BlockSource(tensors), PretrainedConfig(), module, "cpu", threads=2)
        backend.load()
    return backend


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("ggml_type", ["Q8_0", "Q4_K", "BF16"])
def test_linear_matches_reference(isa, ggml_type):
    out_f, in_f = 75, 256
    gen = torch.Generator().manual_seed(0)
    blocks = make_blocks(torch.randn(out_f, in_f, generator=gen), ggml_type)
    bias = torch.randn(out_f, generator=gen)
    backend = _linear((ggml_type, (out_f, in_f), blocks), bias, isa)
    assert backend.weight_type == ggml_type and backend.repacked_bytes == 0
    x = torch.randn(2, 3, in_f, generator=gen)
    y = backend(x)
    assert y.shape == (2, 3, out_f)
    w = dequantize(blocks, ggml_type).reshape(out_f, in_f)
    flat = x.reshape(-1, in_f).double().numpy()
    ref = flat @ w.T + bias.double().numpy()
    bound = matmul_bound(flat, w, _engine.activation_format(isa, ggml_type)) + 1e-6
    assert np.all(np.abs(y.reshape(-1, out_f).double().numpy() - ref) <= bound)


def test_linear_on_state_dict_and_transformed_weights():
    """Float tensors of a state dict are used in place; a weight only available through a
    transform (no raw bytes) is loaded once as float32 and counted in repacked_bytes."""
    weight = torch.randn(48, 64)
    module = nn.Linear(64, 48, bias=False, device="meta")
    direct = KLinearCPUInfer("proj", StateDictSource({"proj.weight": weight}), PretrainedConfig(), module, "cpu")
    direct.load()
    assert direct.repacked_bytes == 0 and direct.weight_type == "F32"
    assert own_memory(direct) == BackendMemory(mapped=48 * 64 * 4)  # what kt bench reports
    x = torch.randn(4, 64)
    torch.testing.assert_close(direct(x), x @ weight.T, rtol=1e-5, atol=1e-5)

    class TransformedSource(StateDictSource):
        def raw(self, name):
            from kt_core.weights.gguf_source import RawUnavailableError

            raise RawUnavailableError(f"{name} is made by a transform")

    moved = KLinearCPUInfer("proj", TransformedSource({"proj.weight": weight.half()}), PretrainedConfig(), module, "cpu")
    moved.load()
    assert moved.repacked_bytes == 48 * 64 * 4 and moved.weight_type == "F32"
    assert own_memory(moved) == BackendMemory(repacked=48 * 64 * 4)
    torch.testing.assert_close(moved(x), x @ weight.half().float().T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", ["linear", "experts"])
def test_engine_operators_refuse_a_gpu_placement(make):
    """The pool computes in host memory: a rule (or --device-map) putting them on a GPU is an error."""
    source = StateDictSource({})
    with pytest.raises(ValueError, match=r"runs on the CPU, but was placed on cuda.*set its device to 'cpu'") as error:
        if make == "linear":
            KLinearCPUInfer("proj", source, PretrainedConfig(), nn.Linear(64, 48, bias=False, device="meta"), "cuda:0")
        else:
            KExpertsCPU(KEY, source, moe_config(4, 64, 32), None, "cuda")
    assert str(error.value).startswith("KLinearCPUInfer at proj" if make == "linear" else f"KExpertsCPU at {KEY}")
