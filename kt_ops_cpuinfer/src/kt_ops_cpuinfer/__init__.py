"""kt-ops-cpuinfer: the native CPU engine computing MoE experts and linear layers on GGUF blocks.

The engine (the C++ extension `kt_ops_cpuinfer._engine`) multiplies quantized weights as
they are stored in the GGUF file, with activations quantized per block the way ggml
does, on a persistent thread pool; `KExpertsCPU` runs a layer's routed experts
asynchronously (`submit`/`sync`) so the caller can compute the shared experts meanwhile.
Rules use the operators by name: ``generate_op: KExpertsCPU`` under
`KTransformersExperts`, or `KLinearCPUInfer` under `KTransformersLinear`.

Kernel paths: AVX2 (baseline) and AVX-512 with VNNI/BF16, chosen by CPUID. Force one with
the environment variable ``KT_CPUINFER_ISA=avx2`` (or ``avx512``/``auto``) or `set_isa`.
"""

from kt_ops_cpuinfer.isa import ISA_ENV, current_isa, set_isa, supported_isas, use_isa
from kt_ops_cpuinfer.weight_types import COMPUTABLE_TYPES

__all__ = ["COMPUTABLE_TYPES", "ISA_ENV", "current_isa", "set_isa", "supported_isas", "use_isa"]
