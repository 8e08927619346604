"""The group sizes the int4 format allows, and which weights fit them (no torch needed).

A group size is ``-1`` (one scale per output channel) or a positive multiple of 32:
torch's CPU int4 kernel only takes groups of 32, 64, 128 or 256, and any multiple of 32
can be expressed there by repeating scales, so one format serves both devices. Kept free
of torch so the rule-file kwargs model can validate it at plugin registration.
"""

from __future__ import annotations

GROUP_SIZE_MULTIPLE = 32
PER_CHANNEL = -1
PACK_MULTIPLE = 8
"""K of a per-channel weight must be a multiple of this: the packed layout holds 8 values per int32."""


def validate_group_size(group_size: int) -> int:
    """`group_size` if it is -1 (per-channel) or a positive multiple of 32, else ``ValueError``."""
    if group_size != PER_CHANNEL and (group_size <= 0 or group_size % GROUP_SIZE_MULTIPLE):
        raise ValueError(
            f"group_size must be -1 (per-channel) or a positive multiple of {GROUP_SIZE_MULTIPLE}, got {group_size} "
            "(torch's CPU int4 kernel takes groups of 32/64/128/256; multiples of 32 map onto them)"
        )
    return group_size


def effective_group_size(in_features: int, group_size: int) -> int:
    """The number of K elements sharing a scale: `group_size`, or K when it is -1 (per-channel)."""
    validate_group_size(group_size)
    return in_features if group_size == PER_CHANNEL else group_size


def shape_problem(name: str, in_features: int, group_size: int) -> str | None:
    """Why a weight named `name` with `in_features` columns cannot take `group_size`, or None if it can.

    Returned as text (not raised) so a loader can list every unusable tensor of a model
    in one message before reading any of them.
    """
    validate_group_size(group_size)
    if group_size == PER_CHANNEL:
        if in_features % PACK_MULTIPLE:
            return (
                f"{name}: in_features K={in_features} is not a multiple of {PACK_MULTIPLE}, "
                "which the packed int4 layout needs (8 values per int32)"
            )
        return None
    if in_features % group_size:
        fits = [g for g in (256, 128, 64, 32) if in_features % g == 0]
        hint = f"group_size: {fits[0]}" if fits else "group_size: -1 (per-channel)"
        return (
            f"{name}: in_features K={in_features} is not divisible by group_size={group_size}; "
            f"set a group size that divides K in the rule's kwargs (e.g. {hint})"
        )
    return None
