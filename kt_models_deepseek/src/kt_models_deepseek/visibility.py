"""Which keys each query may attend to, from positions (and a padding mask when given).

kt's attention masks by position rather than relying on a precomputed mask: a key at
position (or static-cache slot) ``j`` is visible to a query at position ``p`` iff
``j <= p``. That rule is right for prefill, decode and a static cache whose unwritten
slots hold zeros, and needs nothing from the caller beyond ``position_ids``. A 4-D mask
that transformers built (``create_causal_mask``: boolean, or additive with 0 where
visible) is combined with it, so padding still hides keys; other mask forms (flex
attention's BlockMask) are not read.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch


def query_positions(
    position_ids: torch.Tensor | None, batch: int, seq_len: int, past: int | torch.Tensor, device: torch.device
) -> torch.Tensor:
    """[batch, seq_len] positions: `position_ids` broadcast to the batch, else past + 0..seq_len-1."""
    if position_ids is None:
        positions = torch.arange(seq_len, device=device) + torch.as_tensor(past, device=device)
        return positions.unsqueeze(0).expand(batch, seq_len)
    positions = position_ids.to(device)
    if positions.dim() == 1:
        positions = positions.unsqueeze(0)
    if positions.shape[-1] != seq_len:
        raise ValueError(f"position_ids cover {positions.shape[-1]} tokens but the call has {seq_len}")
    return positions.expand(batch, seq_len)


def key_visibility(q_positions: torch.Tensor, k_positions: torch.Tensor, attention_mask: Any = None) -> torch.Tensor:
    """Boolean [batch, 1, s, T]: True where query i (at `q_positions`) sees key j (at `k_positions`).

    `k_positions` is [batch or 1, T]. A 4-D tensor `attention_mask` whose last dimension
    indexes the same keys (it may be longer, as for a static cache) further restricts it.
    """
    visible = k_positions[:, None, None, :] <= q_positions[:, None, :, None]
    if not isinstance(attention_mask, torch.Tensor):
        return visible
    if attention_mask.dim() != 4:
        raise ValueError(
            f"expected a 4-D attention mask [batch, 1, queries, keys], got shape {tuple(attention_mask.shape)}"
        )
    num_keys = k_positions.shape[-1]
    if attention_mask.shape[-1] < num_keys:
        raise ValueError(f"the attention mask covers {attention_mask.shape[-1]} keys but there are {num_keys}")
    mask = attention_mask[..., :num_keys].to(visible.device)
    allowed = mask if mask.dtype == torch.bool else mask == 0
    return visible & allowed


def visible_prefix_lengths(visible: torch.Tensor) -> torch.Tensor | None:
    """[batch, s] int32 counts when every query of boolean `visible` [batch, 1, s, T] sees a
    prefix of the keys (keys 0..n-1, as causal attention over a cache does); None when some
    query's visible keys have a gap (padding), which a prefix-only kernel cannot express."""
    counts = visible.sum(dim=-1, dtype=torch.int32)[:, 0]
    prefix = torch.arange(visible.shape[-1], device=visible.device) < counts[..., None]
    return counts if bool(torch.equal(prefix, visible[:, 0])) else None


class PrefixCountsMemo:
    """The visible-prefix counts of one forward call, computed once for all its layers.

    Every layer of a forward gets the same mask and position tensors and (with a static
    cache, all layers advancing together) the same key count, so the counts —
    `key_visibility` and `visible_prefix_lengths`, half a dozen torch ops — are the same
    for all of them. The memo holds one entry, recognized by the very tensor objects it
    was computed from (weak references: a new forward's fresh tensors never match an old
    entry) and the key count.
    """

    def __init__(self) -> None:
        self._key: tuple[Any, ...] | None = None
        self._counts: list[int] | None = None

    def counts(self, positions: list[int], num_keys: int, attention_mask: Any, position_ids: Any) -> list[int] | None:
        """The query at ``positions[i]`` (one sequence) sees keys [0, counts[i]) of `num_keys`;
        None when some query's visible keys are not a prefix."""
        key = (_ref(attention_mask), _ref(position_ids), num_keys, tuple(positions))
        if self._key is not None and _same(self._key, key):
            return self._counts
        q_positions = torch.tensor([positions])
        k_positions = torch.arange(num_keys).unsqueeze(0)
        prefix = visible_prefix_lengths(key_visibility(q_positions, k_positions, attention_mask))
        self._key, self._counts = key, (prefix[0].tolist() if prefix is not None else None)
        return self._counts


def _ref(value: Any) -> Any:
    return weakref.ref(value) if isinstance(value, torch.Tensor) else value


def _same(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Entries match when their tensors are the same live objects and the rest is equal."""
    for x, y in zip(a, b, strict=True):
        if isinstance(x, weakref.ref) or isinstance(y, weakref.ref):
            if not (isinstance(x, weakref.ref) and isinstance(y, weakref.ref)) or x() is None or x() is not y():
                return False
        elif x != y:
            return False
    return True
