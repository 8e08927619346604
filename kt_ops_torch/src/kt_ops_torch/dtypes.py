"""Turning a dtype name from a rule file into a torch dtype."""

from __future__ import annotations

import torch


def resolve_dtype(name: str | None) -> torch.dtype:
    """``"bfloat16"`` → ``torch.bfloat16``; None → torch's current default dtype."""
    return torch.get_default_dtype() if name is None else getattr(torch, name)
