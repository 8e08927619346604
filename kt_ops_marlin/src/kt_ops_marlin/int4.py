"""Symmetric int4 quantization with per-group scales along the input dimension.

The format every kt-ops-marlin path shares (the Triton kernel on the GPU, torch's int4
matmul on the CPU), so a rule file gives the same numbers wherever it places a layer:

* a weight ``W [N, K]`` (out features × in features, any leading batch dimensions) is
  cut along K into groups of ``group_size`` consecutive elements (``-1``: one group per
  output channel, i.e. ``group_size = K``);
* each group has one scale ``s = absmax / 7.5``, rounded *up* to the scale dtype, and
  each element becomes ``q = clamp(round(w / s), -8, 7)``;
* the dequantized value is ``q · s``.

Why ``absmax / 7.5``: the sixteen int4 levels ``-8 … 7`` times ``s`` then cover
``[-absmax, absmax]`` with a step of ``s``, and every element, the clamped ``+absmax``
included, is within ``s / 2`` of its level — the smallest step (and error bound) a
symmetric grid through zero allows. Rounding the scale *up* when it is stored in a
16-bit dtype keeps ``|w / s| ≤ 7.5``, so storing the scale never breaks that bound.

Which group sizes are allowed, and which K fit them, is `group_size`'s business.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kt_ops_marlin.group_size import effective_group_size, shape_problem

INT4_MIN = -8
INT4_MAX = 7
LEVELS_PER_SIDE = 7.5
"""``absmax / LEVELS_PER_SIDE`` is a group's scale: the grid ``-8s … 7s`` covers ``±absmax`` with step s."""


@dataclass(frozen=True)
class Int4Weight:
    """A quantized weight: int4 values (held in int8) ``[..., N, K]`` and scales ``[..., N, K // group_size]``."""

    q: torch.Tensor
    scales: torch.Tensor
    group_size: int
    """The effective group size (K for a per-channel weight), never -1."""

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight these values stand for, ``q · s`` (see `dequantize_int4`)."""
        return dequantize_int4(self.q, self.scales, self.group_size, dtype)


_SAME_WIDTH_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Non-negative float32 `values` cast to `dtype`, never below the original.

    Where rounding went down, the next representable value is taken by incrementing the
    bit pattern (for non-negative floats the order of bit patterns is the order of
    values) — plain integer arithmetic, available for every dtype on every device.
    """
    cast = values.to(dtype)
    below = cast.float() < values
    if bool(below.any()):
        as_int = _SAME_WIDTH_INT[dtype.itemsize]
        cast = torch.where(below, (cast.view(as_int) + 1).view(dtype), cast)
    return cast


_CHUNK_ELEMENTS = 1 << 24
"""Rows are quantized in chunks of about this many elements, bounding the float32
temporaries to ~64 MiB each whatever the weight's size (a 102400 × 2048 lm_head would
otherwise need ~2.5 GB of them on the GPU)."""


def quantize_int4(weight: torch.Tensor, group_size: int = 128, scale_dtype: torch.dtype = torch.float32) -> Int4Weight:
    """Quantize `weight` ``[..., N, K]`` to symmetric int4 with one scale per group of K.

    Computed in float32 on the weight's own device (so a GPU quantizes its weights
    itself). `scale_dtype` is the dtype the kernels read scales in; the int4 values are
    chosen against the stored (rounded) scale so ``|w - q·s| ≤ s/2`` holds for every
    element. Raises ``ValueError`` if K does not fit `group_size`.
    """
    if weight.dim() < 2:
        raise ValueError(f"int4 quantization needs a weight of at least 2 dimensions [..., N, K], got {tuple(weight.shape)}")
    k = weight.shape[-1]
    problem = shape_problem("weight", k, group_size)
    if problem is not None:
        raise ValueError(problem)
    group = effective_group_size(k, group_size)
    rows = weight.reshape(-1, k)
    q = torch.empty(rows.shape, dtype=torch.int8, device=weight.device)
    scales = torch.empty((rows.shape[0], k // group), dtype=scale_dtype, device=weight.device)
    step = max(1, _CHUNK_ELEMENTS // k)
    for start in range(0, rows.shape[0], step):
        end = min(start + step, rows.shape[0])
        q[start:end], scales[start:end] = _quantize_rows(rows[start:end], group, scale_dtype)
    return Int4Weight(q.reshape(weight.shape), scales.reshape(*weight.shape[:-1], k // group), group)


def _quantize_rows(rows: torch.Tensor, group: int, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 values ``[R, K]`` and scales ``[R, K // group]`` of float rows ``[R, K]``."""
    w = rows.float().reshape(rows.shape[0], -1, group)
    absmax = w.abs().amax(dim=-1)
    if not bool(torch.isfinite(absmax).all()):
        raise ValueError("int4 quantization: the weight holds inf or NaN")
    scales = _round_up_to(absmax / LEVELS_PER_SIDE, scale_dtype)
    if not bool(torch.isfinite(scales).all()):
        raise ValueError(f"int4 quantization: a group's scale overflows {scale_dtype} (absmax {float(absmax.max()):.4g})")
    divisor = scales.float()
    divisor = torch.where(divisor == 0, torch.ones_like(divisor), divisor)  # an all-zero group: q = 0
    q = torch.round(w / divisor.unsqueeze(-1)).clamp_(INT4_MIN, INT4_MAX).to(torch.int8)
    return q.reshape(rows.shape), scales


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q · s`` for int4 values ``[..., N, K]`` and scales ``[..., N, K // group_size]``.

    The product is formed in float32 — exact for 16-bit scales (4 + 11 significant bits),
    rounded once for float32 ones — then cast to `dtype`: this is the reference every
    kernel is tested against.
    """
    k = q.shape[-1]
    if group_size <= 0 or k % group_size or scales.shape[-1] != k // group_size:
        raise ValueError(
            f"int4 values of shape {tuple(q.shape)} do not fit scales {tuple(scales.shape)} with group size {group_size}"
        )
    w = q.float().reshape(*q.shape[:-1], k // group_size, group_size) * scales.float().unsqueeze(-1)
    return w.reshape(q.shape).to(dtype)
