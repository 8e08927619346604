"""`MoEJob`: one submitted job of the engine's MoE layer and the tensors it reads and writes.

The engine computes a job on its pool after ``submit`` has returned, reading the rows,
routing and weights and writing the output through raw pointers: those tensors must stay
alive until the job is waited for, and a layer takes one job at a time. `KExpertsCPU`
(routed experts) and `KMLPCPUInfer` (a gated MLP as a one-expert layer) both start jobs
this way; the rule lives here once.
"""

from __future__ import annotations

from typing import Any

import torch

from kt_ops_cpuinfer.dtypes import ENGINE_DTYPES


class MoEJob:
    """At most one in-flight job of an engine MoE layer; `operator` and `key` name it in errors."""

    def __init__(self, operator: str, key: str) -> None:
        self.operator, self.key = operator, key
        self._inflight: tuple[Any, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def pending(self) -> bool:
        return self._inflight is not None

    def start(self, layer: Any, rows: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        """Submit `rows` [T, H] (an engine dtype) routed by `ids`/`weights` [T, k] (int64/float32, CPU, contiguous)."""
        if self._inflight is not None:
            raise RuntimeError(f"{self.operator}.submit() at {self.key} while a previous submit() awaits its sync()")
        tokens, top_k = ids.shape
        out = torch.empty(tokens, rows.shape[1], dtype=rows.dtype)
        kind = ENGINE_DTYPES[rows.dtype]
        layer.submit(rows.data_ptr(), ids.data_ptr(), weights.data_ptr(), out.data_ptr(), tokens, top_k, kind, kind)
        self._inflight = (layer, rows, ids, weights, out)

    def wait(self) -> torch.Tensor:
        """Wait for the started job and return its output [T, H] in the rows' dtype."""
        if self._inflight is None:
            raise RuntimeError(f"{self.operator}.sync() at {self.key} without a submit()")
        layer, out = self._inflight[0], self._inflight[4]
        try:
            layer.sync()
        finally:
            self._inflight = None
        return out
