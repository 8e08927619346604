"""The GPU kernel: 16-bit (or 32-bit) activations × packed int4 weights, float32 accumulation.

Decode is bound by how many bytes of weights are read per token; int4 weights read a
quarter of the bytes of bf16 ones. This kernel streams the packed words (`packing`),
unpacks each nibble to its integer ``q`` in registers, and multiplies tiles with
``tl.dot`` in the activation dtype — exact, since ``-8 … 7`` is representable in every
float dtype — accumulating in float32. The group scale is applied to each tile's
partial sum (a ``BLOCK_K`` tile never straddles two groups), so the result equals
``x @ (q·s)ᵀ`` with ``q·s`` in full precision, up to float32 summation order.

Small batches (decode) give few output tiles, too few to keep every SM reading, so K is
split across a third grid dimension; the partial sums land in a float32 workspace and
are added by one ``sum``. Tiles come from a simple heuristic (no autotuning).

Triton is optional: without it this module still imports, `triton_available()` is
False and `int4_matmul_triton` raises an error that says how to install it. With
``TRITON_INTERPRET=1`` set before triton is imported, the same kernel runs on the CPU
(how CI tests it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

try:  # optional dependency: only the GPU path needs it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None
    tl = None

TRITON_INSTALL_HINT = "pip install --no-deps triton==3.9.0"


def triton_available() -> bool:
    """Whether triton can be imported (the CUDA int4 path needs it)."""
    return triton is not None


@dataclass(frozen=True)
class Tiles:
    """Tile sizes and the K split of one launch."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1


if triton is not None:

    @triton.jit
    def _int4_matmul_kernel(
        x_ptr, w_ptr, s_ptr, out_ptr,
        M, N, K, group_size, k_blocks, k_blocks_per_split,
        stride_xm, stride_xk, stride_wk, stride_wn, stride_sg, stride_sn, stride_os, stride_om, stride_on,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, FP32_DOT: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        pid_k = tl.program_id(2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        n_mask = offs_n < N
        shifts = (offs_k % 8) * 4
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        first = pid_k * k_blocks_per_split
        for kb in range(first, tl.minimum(first + k_blocks_per_split, k_blocks)):
            k0 = kb * BLOCK_K
            ks = k0 + offs_k
            k_mask = ks < K
            # Activations outside K load as 0, so whatever the padded nibbles hold adds nothing.
            x = tl.load(
                x_ptr + offs_m[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=m_mask[:, None] & k_mask[None, :], other=0.0,
            )
            words = tl.load(
                w_ptr + (ks[:, None] // 8) * stride_wk + offs_n[None, :] * stride_wn,
                mask=k_mask[:, None] & n_mask[None, :], other=0,
            )
            q = ((words >> shifts[:, None]) & 0xF) - 8
            if FP32_DOT:
                part = tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(x, q.to(x.dtype))
            scale = tl.load(s_ptr + (k0 // group_size) * stride_sg + offs_n * stride_sn, mask=n_mask, other=0.0)
            acc += part * scale.to(tl.float32)[None, :]
        out = out_ptr + pid_k * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _interpreting() -> bool:
    """Whether the kernel was built by triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_int4_matmul_kernel, InterpretedFunction)


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether tiles are multiplied in IEEE float32 rather than in the activation dtype.

    Always for float32 activations (TF32 would round them). Also for bfloat16 under the
    interpreter: triton 3.9's interpreter mis-converts integers to bfloat16 and
    mis-multiplies bfloat16 dots (and truncates float32 → bfloat16 on store, so there
    the result is stored in float32 and rounded by torch), while on a GPU all three are
    correct. The result is the same
    either way — a bfloat16 activation times an int4 value is exact in float32 and the
    accumulation is float32 in both — so the interpreter still checks the kernel's
    indexing, unpacking, scaling and K split for bfloat16 inputs.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and _interpreting())


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1  # the interpreter: one program at a time, splitting K gains nothing


def choose_tiles(m: int, n: int, k: int, group_size: int, device: torch.device) -> Tiles:
    """Tile sizes for an ``[m, k] × [k, n]`` product whose scales change every `group_size` rows of K.

    ``BLOCK_K`` divides the group size so one scale serves a whole tile; small batches
    use narrow N tiles and split K until there are about two programs per SM.
    """
    block_k = next(b for b in (128, 64, 32) if group_size % b == 0 or group_size >= k)
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if m <= 32 else 128
    k_blocks = triton.cdiv(k, block_k) if triton is not None else -(-k // block_k)
    tiles = -(-m // block_m) * -(-n // block_n)
    target = 2 * _multiprocessors(device)
    split_k = max(1, min(k_blocks, target // max(tiles, 1)))
    return Tiles(block_m, block_n, block_k, split_k)


def int4_matmul_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    *,
    tiles: Tiles | None = None,
) -> torch.Tensor:
    """``x [M, K] @ Wᵀ`` for ``W = q·s`` packed as ``qweight [K // 8, N]`` with ``scales [K // group_size, N]``.

    `group_size` is the effective group (K for a per-channel weight). Returns ``[M, N]``
    in the dtype of `x` (float16, bfloat16 or float32; float32 multiplies in IEEE fp32,
    not TF32, so it matches the float reference).
    """
    if triton is None:
        raise RuntimeError(f"the CUDA int4 path of kt-ops-marlin needs triton, which is not installed: {TRITON_INSTALL_HINT}")
    if x.dim() != 2 or qweight.dim() != 2 or scales.dim() != 2:
        raise ValueError(f"int4_matmul_triton needs 2-D x, qweight, scales; got {x.shape}, {qweight.shape}, {scales.shape}")
    m, k = x.shape
    n = qweight.shape[1]
    if qweight.dtype != torch.int32 or qweight.shape[0] * 8 != k:
        raise ValueError(f"qweight must be int32 [K // 8, N] = [{k // 8}, N], got {qweight.dtype} {tuple(qweight.shape)}")
    if k % group_size or scales.shape != (k // group_size, n):
        raise ValueError(f"scales must be [K // group_size, N] = [{k // group_size}, {n}], got {tuple(scales.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"int4_matmul_triton takes float16, bfloat16 or float32 activations, got {x.dtype}")
    if m == 0:
        return x.new_empty((0, n))
    t = tiles or choose_tiles(m, n, k, group_size, x.device)
    if group_size % t.block_k and group_size < k:
        raise ValueError(f"block_k={t.block_k} must divide the group size {group_size}")
    k_blocks = triton.cdiv(k, t.block_k)
    per_split = triton.cdiv(k_blocks, t.split_k)
    splits = triton.cdiv(k_blocks, per_split)
    direct = splits == 1 and not (x.dtype == torch.bfloat16 and _interpreting())
    out = torch.empty((splits, m, n), device=x.device, dtype=x.dtype if direct else torch.float32)
    grid = (triton.cdiv(m, t.block_m), triton.cdiv(n, t.block_n), splits)
    _int4_matmul_kernel[grid](
        x, qweight, scales, out,
        m, n, k, group_size, k_blocks, per_split,
        x.stride(0), x.stride(1), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=t.block_m, BLOCK_N=t.block_n, BLOCK_K=t.block_k, FP32_DOT=_fp32_dot(x.dtype),
    )
    return out[0] if direct else out.sum(dim=0).to(x.dtype)
