"""Kwargs of the Qwen operators (imported at registration, before any operator is used)."""

from __future__ import annotations

from kt_core.operator_kwargs import OperatorKwargs


class QwenMoeBlockKwargs(OperatorKwargs):
    """Kwargs of the Qwen MoE blocks: only where routing runs.

    Where the routed experts and the shared expert run is decided by the rules that
    replace (or place) the block's ``experts`` and ``shared_expert`` children.
    """
