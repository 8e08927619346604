"""IQ4_NL and IQ4_XS: 4-bit indices into a fixed non-uniform codebook, scaled.

Both store per value an index into `CODEBOOK` (16 int8 values, denser near zero); a
value is ``scale * CODEBOOK[q]``. IQ4_NL has one fp16 ``d`` per 32 values. IQ4_XS has a
signed 6-bit ``sc[j] ∈ [-32, 31]`` per 32-value sub-block under one fp16 ``d`` per 256
values, so the scale of sub-block ``j`` is ``d * sc[j]``.

Quantizing: each 32-value (sub-)block gets its best float scale from `search_grid_scale`
(nearest-entry assignment, least-squares refit, a ladder of candidate scales mapping the
extreme onto either end of the codebook). For IQ4_XS the sub-block scale of largest
magnitude then maps to -32 (``d = -max / 32``) and the others are rounded to 6-bit
multiples of ``d``, each then re-picked among its nearest integers by the error it
actually gives (`refine_sub_block_scales`). Finally every value takes the codebook entry nearest to it under the
scale it will be decoded with.

Layouts (little endian):

- IQ4_NL, 18 bytes: ``d: f16`` @0, ``qs: u8[16]`` @2; byte ``i`` holds value ``i`` in its
  low nibble and value ``i + 16`` in its high nibble (Q4_0's packing).
- IQ4_XS, 136 bytes: ``d: f16`` @0, ``scales_h: u16`` @2, ``scales_l: u8[4]`` @4,
  ``qs: u8[128]`` @8. ``sc[j] + 32`` (6 bits) keeps its low four bits in ``scales_l[j // 2]``
  (low nibble for even ``j``) and its top two in bits ``2j`` of ``scales_h``. ``qs`` bytes
  ``16j … 16j + 15`` hold sub-block ``j`` packed as an IQ4_NL block.
"""

from __future__ import annotations

import torch

from .iq_quants import CODEBOOK
from .quantize_search import GROUP_MAX_EPS, NearestEntry, refine_sub_block_scales, search_grid_scale

SUPER_BLOCK = 256
SUB_BLOCK = 32
N_SUB = SUPER_BLOCK // SUB_BLOCK

_GRID = NearestEntry(CODEBOOK)


def _nearest_indices(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Codebook index (uint8) nearest to each ``values / scale``; index of the entry 1 where scale is 0.

    CODEBOOK[8] = 1 is the entry nearest zero, so a zero-scale block decodes to zeros
    whatever its indices; 8 keeps them tidy.
    """
    usable = scale != 0
    scaled = values / torch.where(usable, scale, torch.ones_like(scale))
    index = _GRID.indices(scaled)
    return torch.where(usable, index, torch.full_like(index, 8))


def _reconstruct(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`values` as they decode after nearest-entry assignment under `scale`."""
    usable = scale != 0
    return _GRID.values(values / torch.where(usable, scale, torch.ones_like(scale))).mul_(usable * scale)


def _pack_nibbles(index: torch.Tensor) -> torch.Tensor:
    """(..., 32) indices → (..., 16) bytes: value i low nibble, value i + 16 high nibble."""
    return index[..., :16] | (index[..., 16:] << 4)


def encode_iq4_nl(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_NL: (B, 32) float32 → (B, 18) bytes."""
    d = search_grid_scale(blocks, _GRID).unsqueeze(1).to(torch.float16)
    index = _nearest_indices(blocks, d.float())
    return torch.cat([d.view(torch.uint8), _pack_nibbles(index)], dim=1)


def encode_iq4_xs(blocks: torch.Tensor) -> torch.Tensor:
    """IQ4_XS: (B, 256) float32 → (B, 136) bytes."""
    n_blocks = blocks.shape[0]
    scale = search_grid_scale(blocks.view(n_blocks * N_SUB, SUB_BLOCK), _GRID).view(n_blocks, N_SUB)

    index = scale.abs().argmax(dim=1, keepdim=True)
    extreme = torch.gather(scale, 1, index)
    empty = extreme.abs() < GROUP_MAX_EPS
    safe = torch.where(empty, torch.ones_like(extreme), extreme)
    sc = torch.where(empty, torch.zeros_like(scale), scale * (-32.0 / safe)).round_().clamp_(-32, 31)
    d = torch.where(empty, torch.zeros_like(extreme), -extreme / 32).to(torch.float16)

    values = blocks.view(n_blocks, N_SUB, SUB_BLOCK)
    sc = refine_sub_block_scales(values, d.float(), sc, (-32, 31), _reconstruct)
    step = (d.float() * sc).unsqueeze(-1)
    codes = _nearest_indices(values, step)
    u = sc.add_(32).to(torch.uint8)
    low = u & 0x0F
    scales_l = low[:, 0::2] | (low[:, 1::2] << 4)
    top = (u >> 4).view(n_blocks, 2, 4) << torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
    scales_h = top.sum(dim=2, dtype=torch.uint8)  # the u16's low byte (j < 4), then its high byte
    return torch.cat(
        [d.view(torch.uint8), scales_h, scales_l, _pack_nibbles(codes).view(n_blocks, SUPER_BLOCK // 2)], dim=1
    )
