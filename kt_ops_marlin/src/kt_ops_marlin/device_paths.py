"""Which int4 kernel a device uses, and a float weight prepared for it.

The device a backend runs on decides its path: ``cuda`` → the Triton kernel on the
packed layout of `packing`; ``cpu`` → torch's CPU int4 matmul (`cpu_int4`). Both start
from the same `int4.quantize_int4` values and scales, so the numbers do not depend on
where a rule placed the layer; only the summation order does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from kt_ops_marlin.cpu_int4 import cpu_int4_available, prepare_cpu_int4
from kt_ops_marlin.int4 import Int4Weight, quantize_int4
from kt_ops_marlin.notes import DEVICE_NOTES
from kt_ops_marlin.packing import pack_int4
from kt_ops_marlin.triton_kernel import TRITON_INSTALL_HINT, int4_matmul_triton, triton_available


class Int4Matmul(Protocol):
    """A weight ``[N, K]`` in one device's int4 format: ``w(x [..., K]) → [..., N]``."""

    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class TritonInt4Weight:
    """A weight packed for the Triton kernel: ``qweight [K // 8, N]`` int32, ``scales [K // group, N]``."""

    qweight: torch.Tensor
    scales: torch.Tensor
    group_size: int
    in_features: int
    out_features: int

    @property
    def nbytes(self) -> int:
        return self.qweight.numel() * 4 + self.scales.numel() * self.scales.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        out = int4_matmul_triton(x2, self.qweight, self.scales, self.group_size)
        return out.reshape(*lead, self.out_features).to(x.dtype)


def path_note(device: torch.device | str) -> str:
    """The note for a backend running on `device` (``"int4, CPU path"``)."""
    kind = torch.device(device).type
    return DEVICE_NOTES.get(kind, f"int4 on {kind}: unsupported (kt-ops-marlin runs on cuda or cpu)")


def path_problem(device: torch.device | str) -> str | None:
    """Why int4 weights cannot be computed on `device` in this environment, or None."""
    kind = torch.device(device).type
    if kind == "cuda":
        return None if triton_available() else f"int4 on cuda needs triton, which is not installed ({TRITON_INSTALL_HINT})"
    if kind == "cpu":
        return None if cpu_int4_available() else f"torch {torch.__version__} has no CPU int4 matmul (needs torch >= 2.5)"
    return f"kt-ops-marlin computes on cuda or cpu, not {kind}"


def prepare_quantized(weight: Int4Weight, dtype: torch.dtype, device: torch.device | str) -> Int4Matmul:
    """Lay out already quantized ``[N, K]`` int4 values for `device`'s kernel (scales already in `dtype`)."""
    device = torch.device(device)
    problem = path_problem(device)
    if problem is not None:
        raise RuntimeError(problem)
    n, k = weight.q.shape
    if device.type == "cuda":
        return TritonInt4Weight(pack_int4(weight.q), weight.scales.t().to(dtype).contiguous(), weight.group_size, k, n)
    return prepare_cpu_int4(weight, dtype)


def prepare_int4(weight: torch.Tensor, group_size: int, dtype: torch.dtype, device: torch.device | str) -> Int4Matmul:
    """Quantize a float weight ``[N, K]`` on `device` (scales in `dtype`) and lay it out for its kernel."""
    device = torch.device(device)
    problem = path_problem(device)
    if problem is not None:
        raise RuntimeError(problem)
    return prepare_quantized(quantize_int4(weight.to(device), group_size, dtype), dtype, device)
