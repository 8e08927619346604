"""The contract of a fused absorbed-MLA step: what an attention hands a backend to fuse.

In decode, MLA's absorbed attention is a dozen small products with elementwise work
between them (the split, the norm, the rotary embedding, the cache write). A backend that
computes all of them itself (the CPU engine) can run the whole step as one call and skip
the per-op overhead, which on a small CPU costs more than the arithmetic. The attention
operator (a model plugin) describes its parts here; the per-head backend it was given
(`HeadwiseLinearBackend.fused_absorbed_attention`) decides whether it can fuse them; kt
core knows neither side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch
from torch import nn

if TYPE_CHECKING:
    from kt_core.backends import HeadwiseLinearBackend

RopeForm = Literal["complex", "interleaved", "half"]
"""How the rotary embedding turns MLA's rope dims: DeepSeek-V2's complex ``freqs_cis``
(interleaved pairs, kept interleaved), DeepSeek-V3's ``(cos, sin)`` with
``rope_interleave`` (interleaved in, halves out), or the rotate-half form."""


@dataclass(frozen=True)
class AbsorbedAttentionParts:
    """An MLA layer's modules as they compute `tokens`-token calls, and its sizes.

    The linear layers are the modules that do the arithmetic for that many tokens (a
    dispatching wrapper's chosen backend, or a plain module); the norms are the modules
    the rules made. Either `q_proj` is set (no q_lora) or all three ``q_a_*``/``q_b_proj``.
    `value_heads` is the backend of the latent → value product (W_UV); the backend asked
    to fuse is the query → latent one (W_UK).
    """

    q_proj: nn.Module | None
    q_a_proj: nn.Module | None
    q_a_layernorm: nn.Module | None
    q_b_proj: nn.Module | None
    kv_a_proj: nn.Module
    kv_a_layernorm: nn.Module
    o_proj: nn.Module
    value_heads: HeadwiseLinearBackend
    heads: int
    nope: int
    rope: int
    latent: int
    v_dim: int
    rope_form: RopeForm
    scale: float


class FusedAbsorbedAttention(Protocol):
    """One absorbed-MLA step for one sequence, writing the new tokens' cache rows in place.

    `x` [s, hidden] are the layer's inputs; `rotary` the position embeddings of those s
    tokens (``freqs_cis`` [s, rope/2] complex, or ``(cos, sin)`` [s, rope]); `keys`
    [rows, latent] and `values` [rows, rope] the layer's static cache buffers, whose rows
    ``start .. start+s-1`` receive the normed latent and the rotated k_pe; query i attends
    to rows ``[0, visible[i])``. Returns o_proj's output [s, hidden] in x's dtype, or None
    when these tensors are not ones it computes on (the caller then runs the step op by op).
    """

    def __call__(
        self,
        x: torch.Tensor,
        rotary: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        keys: torch.Tensor,
        values: torch.Tensor,
        start: int,
        visible: list[int],
    ) -> torch.Tensor | None: ...
