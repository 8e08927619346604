"""The CPU path: the same int4 weights through torch's CPU int4 matmul.

A rule file written for the GPU (``KLinearMarlin`` on ``cuda``) must give the numbers it
would give on a GPU when ``--device-map cuda=cpu`` runs it on a CPU-only machine. So on
the CPU the backends do not fall back to float weights: they hand the very int4 values
and scales of `int4.quantize_int4` to ``torch.ops.aten._weight_int4pack_mm_for_cpu``
(torch ≥ 2.5), which holds 4 bits per weight too.

That kernel's format, checked against `int4.dequantize_int4` by the tests:

* ``_convert_weight_to_int4pack_for_cpu(u, inner_k_tiles)`` takes the unsigned values
  ``u = q + 8`` as int32 ``[N, K]`` and returns its own packed uint8 ``[N, K / 2]``;
* ``_weight_int4pack_mm_for_cpu(x, packed, group, scales_and_zeros)`` computes
  ``x @ ((u - 8) · scale + zero)ᵀ`` with ``scales_and_zeros [K / group, N, 2]`` in the
  dtype of ``x``. Our symmetric format is zero ``0``.

Its limits and how they are met exactly: the group must be 32, 64, 128 or 256 (a group
of ``32·m`` becomes ``m`` groups of 32…256 sharing one scale; a per-channel scale is
repeated over all groups), N must be a multiple of 16 (extra output rows with zero
weights, sliced off), and K of a per-channel weight is padded with zero weights to a
multiple of 32 (the activations get zero columns, adding nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kt_ops_marlin.int4 import Int4Weight

CPU_GROUP_SIZES = (256, 128, 64, 32)
_N_MULTIPLE = 16
_K_MULTIPLE = 32
_INNER_K_TILES = 2  # the CPU layout does not depend on it (2, 4 and 8 give identical bytes)


def cpu_int4_available() -> bool:
    """Whether this torch build has the CPU int4 matmul (``aten._weight_int4pack_mm_for_cpu``)."""
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


@dataclass(frozen=True)
class CpuInt4Weight:
    """One ``[N, K]`` int4 weight in the layout of torch's CPU int4 kernel, ready to multiply."""

    packed: torch.Tensor
    scales_and_zeros: torch.Tensor
    group_size: int
    in_features: int
    out_features: int
    padded_in_features: int

    @property
    def dtype(self) -> torch.dtype:
        """The dtype activations are computed in (that of the scales)."""
        return self.scales_and_zeros.dtype

    @property
    def nbytes(self) -> int:
        return self.packed.numel() * self.packed.element_size() + self.scales_and_zeros.numel() * self.dtype.itemsize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``x [..., K] @ Wᵀ`` → ``[..., N]`` in the dtype of `x`."""
        return int4_matmul_cpu(x, self)


def _cpu_group(group_size: int, padded_k: int, per_channel: bool) -> int:
    target = padded_k if per_channel else group_size
    return next(g for g in CPU_GROUP_SIZES if target % g == 0)


def prepare_cpu_int4(weight: Int4Weight, dtype: torch.dtype) -> CpuInt4Weight:
    """Convert a quantized ``[N, K]`` weight to torch's CPU int4 layout, computing in `dtype`.

    The represented numbers do not change: padding adds zero weights only, and scales
    are repeated, never recomputed (their dtype is `dtype`, which the kernel requires to
    equal the activations'; the backends quantize with scales already in that dtype).
    """
    if not cpu_int4_available():
        raise RuntimeError(
            f"torch {torch.__version__} has no CPU int4 matmul (aten._weight_int4pack_mm_for_cpu); "
            "kt-ops-marlin's CPU path needs torch >= 2.5"
        )
    if weight.q.dim() != 2:
        raise ValueError(f"prepare_cpu_int4 takes one [N, K] weight, got {tuple(weight.q.shape)}")
    n, k = weight.q.shape
    per_channel = weight.group_size == k
    padded_k = -(-k // _K_MULTIPLE) * _K_MULTIPLE if per_channel else k
    padded_n = -(-n // _N_MULTIPLE) * _N_MULTIPLE
    group = _cpu_group(weight.group_size, padded_k, per_channel)

    q = F.pad(weight.q, (0, padded_k - k, 0, padded_n - n))  # zero values: zero weights
    unsigned = (q.to(torch.int32) + 8).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, _INNER_K_TILES)

    source_group = (torch.arange(padded_k // group, device=q.device) * group) // weight.group_size
    source_group = source_group.clamp_(max=weight.scales.shape[-1] - 1)  # padded K columns: any scale, weights are 0
    scales = weight.scales.to(dtype).index_select(-1, source_group)  # [N, K' / group]
    scales = F.pad(scales, (0, 0, 0, padded_n - n))
    scales_and_zeros = torch.stack([scales.t(), torch.zeros_like(scales.t())], dim=-1).contiguous()
    return CpuInt4Weight(packed, scales_and_zeros, group, k, n, padded_k)


def int4_matmul_cpu(x: torch.Tensor, weight: CpuInt4Weight) -> torch.Tensor:
    """``x [..., K] @ Wᵀ`` with torch's CPU int4 kernel; activations computed in the weight's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"int4 CPU matmul: x has {x.shape[-1]} features, the weight takes {weight.in_features}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, weight.in_features).to(weight.dtype)
    if weight.padded_in_features != weight.in_features:
        x2 = F.pad(x2, (0, weight.padded_in_features - weight.in_features))
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x2.contiguous(), weight.packed, weight.group_size, weight.scales_and_zeros
    )
    if out.shape[-1] != weight.out_features:
        out = out[:, : weight.out_features]
    return out.reshape(*lead, weight.out_features).to(x.dtype)
