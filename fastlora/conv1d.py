"""LoRA on transformers' ``Conv1D`` (GPT-2 and the models built like it): a base layer whose weight is stored
(in, out) and whose output is ``x W + b``.

:class:`LoRAConv1D` is a :class:`fastlora.LoRALinear` whose base methods read that weight transposed: the LoRA
math, the torch path and the kernels see W = weightᵀ, an out × in *view* with strides (1, out), never a copy;
merging writes W back transposed.  The adapter's tensors and PEFT file keys are a Linear's (``lora_A`` r × in,
``lora_B`` out × r), as PEFT's ``Linear`` with ``fan_in_fan_out=True`` has them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastlora.adapter_settings import AdapterSettings
from fastlora.layer import LoRALinear

__all__ = ["LoRAConv1D", "is_conv1d"]


def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D, recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers")


class LoRAConv1D(LoRALinear):
    """y = x W + b + scaling · (dropout(x) Aᵀ) Bᵀ for a Conv1D base (``weight`` in × out, ``bias`` out)."""

    @classmethod
    def from_conv1d(cls, conv: nn.Module, adapter_name: str, settings: AdapterSettings, init_lora_weights,
                    adapter_dtype: torch.dtype | None, backend: str = "auto") -> "LoRAConv1D":
        """Wrap ``conv``: its weight and bias are shared (not copied) and frozen."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = conv.weight.shape
        layer.nf = conv.nf  # Conv1D's own name for out_features, which its forward and repr read
        layer.weight, layer.bias = conv.weight, conv.bias
        for p in (conv.weight, conv.bias):
            if p is not None:
                p.requires_grad_(False)
        layer._init_adapter_state(backend)
        layer.add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)
        return layer

    def base_weight(self) -> Tensor:
        return self.weight.t()

    def _out_by_in(self, stored: Tensor) -> Tensor:
        return stored.t()

    def _store_base_weight(self, weight: Tensor) -> None:
        self.weight.copy_(weight.t())

    def base_forward(self, x: Tensor) -> Tensor:
        y = torch.addmm(self.bias, x.reshape(-1, self.in_features), self.weight) if self.bias is not None else \
            torch.mm(x.reshape(-1, self.in_features), self.weight)
        return y.view(*x.shape[:-1], self.out_features)

    def to_base(self) -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D.__new__(Conv1D)
        nn.Module.__init__(conv)
        conv.nf, conv.nx = self.out_features, self.in_features
        conv.weight, conv.bias = self.weight, self.bias
        return conv
