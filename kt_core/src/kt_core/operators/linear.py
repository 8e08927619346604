"""`KTransformersLinear`: a linear layer whose arithmetic is done by a registered backend."""

from __future__ import annotations

import torch
from torch import nn

from kt_core.operators.dispatch import DispatchingModule
from kt_core.registry import OperatorKind


class KTransformersLinear(DispatchingModule):
    """Replaces an ``nn.Linear``; ``generate_op``/``prefill_op`` name linear backends."""

    backend_kind = OperatorKind.LINEAR_BACKEND

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        if not isinstance(module, nn.Linear):
            return f"KTransformersLinear replaces torch.nn.Linear modules, not {type(module).__name__}"
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.numel() // x.shape[-1]
        backend = self.backend_for(num_tokens)
        out = backend(x.to(backend.device))
        return out.to(x.device)
