"""`BaseInjectedModule`: the contract every module-replacing operator follows.

An injected module takes the place of an original module in the model tree. It keeps
the original (built on ``meta``, holding no memory) to read its structure and
configuration, and *adopts the original's children* as its own, so submodules keep their
dotted names (``model.layers.0.self_attn.q_proj``) and rules with ``recursive: true``
can still replace them. Attribute access falls through to the original module, so code
written against the transformers module (``self.num_heads``) keeps working.

The constructor signature is the tutorial's:
``(key, gguf_loader, config, orig_module, generate_device, **kwargs)``; ``gguf_loader`` is
a `WeightSource` (GGUF or safetensors).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PretrainedConfig

from kt_core.backends import BackendMemory
from kt_core.weights.source import WeightSource


class BaseInjectedModule(nn.Module):
    """Base class of operators that replace a module of the model."""

    def __init__(
        self,
        key: str,
        gguf_loader: WeightSource | None,
        config: PretrainedConfig,
        orig_module: nn.Module | None = None,
        generate_device: str = "cpu",
        prefill_device: str | None = None,
        **kwargs: Any,
    ) -> None:
        nn.Module.__init__(self)
        # Not a registered submodule: its parameters are not ours to load or move.
        object.__setattr__(self, "orig_module", orig_module)
        self.key = key
        self.gguf_loader = gguf_loader
        self.config = config
        self.generate_device = str(generate_device)
        self.prefill_device = str(prefill_device or generate_device)
        self.device = torch.device(self.generate_device)
        if orig_module is not None:
            # Directly, not via add_module: attribute fall-through makes every child name
            # look taken already.
            for name, child in orig_module.named_children():
                self._modules[name] = child

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            orig = self.__dict__.get("orig_module")
            if orig is None:
                raise
            return getattr(orig, name)

    @classmethod
    def accepts(cls, module: nn.Module) -> str | None:
        """Why this operator cannot replace `module`, or None if it can (checked at plan time)."""
        return None

    def check_weights(self) -> list[str]:
        """Problems with the weights this operator will read, found before any is read.

        Called by the runtime after injection and before `load`, so a tensor of a type an
        operator cannot compute on is reported at once (naming the tensor and what the
        operator accepts), not after minutes of loading. The default finds none.
        """
        return []

    def consumed_children(self) -> tuple[str, ...]:
        """Names of adopted children whose weights this operator reads itself.

        The runtime neither loads those children's tensors nor expects them off ``meta``
        (the operator never calls them). An MoE block that computes routing from the
        router's weight, or attention that absorbs ``kv_b_proj``, lists them here so
        their weights are not held twice.
        """
        return ()

    def memory(self) -> BackendMemory:
        """What this operator holds beyond torch parameters and buffers (native weights it
        uses in place, copies, scratch), for `kt bench`; nothing by default. A wrapper's
        backends report their own, so a wrapper does not add theirs."""
        return BackendMemory()

    def replace_child(self, name: str, new: nn.Module) -> None:
        """Swap an adopted child, in this module and in the original it delegates to."""
        self._modules[name] = new
        orig = self.__dict__.get("orig_module")
        if orig is not None and name in orig._modules:
            orig._modules[name] = new

    def load(self) -> None:
        """Read this operator's weights from the weight source onto its device.

        The default loads the original module's own parameters and buffers (not its
        children's, which are loaded as modules of their own) under ``key.<name>``.
        """
        orig = self.__dict__.get("orig_module")
        if orig is None or self.gguf_loader is None:
            return
        for name, param in list(orig.named_parameters(recurse=False)):
            tensor = self.gguf_loader.load(f"{self.key}.{name}", dtype=param.dtype, device=self.device)
            setattr(orig, name, nn.Parameter(tensor, requires_grad=False))

    def unload(self) -> None:
        """Release this operator's weights (the inverse of `load`)."""
        orig = self.__dict__.get("orig_module")
        if orig is None:
            return
        for name, param in list(orig.named_parameters(recurse=False)):
            setattr(orig, name, nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        orig = self.__dict__.get("orig_module")
        if orig is None:
            raise RuntimeError(f"{type(self).__name__} at {self.key} has no forward of its own and no original module")
        return orig(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"key={self.key!r}, generate_device={self.generate_device!r}"
