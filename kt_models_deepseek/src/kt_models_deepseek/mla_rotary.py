"""Rotating MLA's positional part (q_pe, k_pe) by the position embeddings the model passes.

transformers' DeepSeek models hand their attention position embeddings in two forms,
and the attention must produce the *same* rotated k_pe as transformers because that
is what goes into the cache:

- DeepSeek-V2: one complex tensor ``freqs_cis`` [b, s, d/2]; the rope dims are
  interleaved pairs (x0, x1), (x2, x3)… each multiplied by one complex frequency, and
  the result stays interleaved.
- DeepSeek-V3: ``(cos, sin)`` [b, s, d] (``cat(freqs, freqs)``). With
  ``config.rope_interleave`` the input pairs are interleaved and the result is laid out
  as all first halves then all second halves (what transformers'
  ``apply_rotary_pos_emb_interleave`` produces); without it, the usual rotate-half form.

The layout of q and k only has to agree with each other (their dot product is what
matters), but matching transformers exactly keeps caches interchangeable.
"""

from __future__ import annotations

import torch

PositionEmbeddings = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _rotate_complex(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(3).type_as(x)


def _rotate_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def apply_mla_rotary(
    q_pe: torch.Tensor, k_pe: torch.Tensor, position_embeddings: PositionEmbeddings, *, interleave: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate `q_pe` [b, H, s, d] and `k_pe` [b, 1, s, d] by `position_embeddings`.

    `interleave` is ``config.rope_interleave`` and only matters for the (cos, sin) form;
    the complex form is always pairwise-interleaved.
    """
    if isinstance(position_embeddings, torch.Tensor):
        if not position_embeddings.is_complex():
            raise TypeError(
                "MLA position embeddings given as one tensor must be complex freqs_cis (DeepSeek-V2's rotary); "
                f"got dtype {position_embeddings.dtype}"
            )
        freqs_cis = position_embeddings.to(q_pe.device).unsqueeze(1)
        return _rotate_complex(q_pe, freqs_cis), _rotate_complex(k_pe, freqs_cis)
    if not (isinstance(position_embeddings, (tuple, list)) and len(position_embeddings) == 2):
        raise TypeError(
            "MLA position embeddings must be complex freqs_cis or a (cos, sin) pair, "
            f"got {type(position_embeddings).__name__}"
        )
    cos, sin = (t.to(q_pe.device) for t in position_embeddings)
    if interleave:
        cos = cos[..., : cos.shape[-1] // 2].unsqueeze(1)
        sin = sin[..., : sin.shape[-1] // 2].unsqueeze(1)
        return _rotate_interleaved(q_pe, cos, sin), _rotate_interleaved(k_pe, cos, sin)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return _rotate_half(q_pe, cos, sin), _rotate_half(k_pe, cos, sin)
