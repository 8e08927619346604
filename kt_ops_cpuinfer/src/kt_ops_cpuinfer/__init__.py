"""kt-ops-cpuinfer: the native CPU MoE engine computing on GGUF quantized blocks.

The engine and its operators (KExpertsCPU, KLinearCPUInfer) arrive with their issue; an
operator is registered only once it is implemented, so this plugin registers nothing yet
and rules naming those operators get "provided by kt-ops-cpuinfer" errors.
"""
