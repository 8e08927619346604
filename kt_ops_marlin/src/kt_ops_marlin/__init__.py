"""kt-ops-marlin: int4 linear and experts backends, `KLinearMarlin` and `KExpertsMarlin`.

Weights from any source are quantized at load to symmetric int4 with per-group scales
(`int4`) and laid out for the device's kernel: a Triton kernel on cuda (`packing`,
`triton_kernel`), torch's CPU int4 matmul on cpu (`cpu_int4`), chosen in
`device_paths`. Triton is optional; only the cuda path needs it.
"""
