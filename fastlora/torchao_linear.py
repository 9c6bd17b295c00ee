"""LoRA on Linears whose weight torchao quantized (transformers' ``TorchAoConfig``, or ``torchao.quantize_``).

torchao keeps the module an ``nn.Linear`` and makes its weight a tensor subclass (``Int8Tensor``, ``Float8Tensor``,
``IntxUnpackedToInt8Tensor``, ...) that reports a float dtype and computes ``F.linear`` through operations of its own.
:class:`LoRATorchaoLinear` holds that Linear as ``base_layer`` and computes what PEFT's ``TorchaoLoraLinear``
computes:

    y = base_layer(x) + scaling · (dropout(x) Aᵀ) Bᵀ    (the term in the adapters' dtype, the sum rounded once to
                                                         the output's dtype)

the dropout mask drawn from a seed, not stored.  Merging follows PEFT, adapter by adapter: W ← quantize(dequantize(W)
+ scaling · B A), the sum rounded to the weight's dtype and quantized again with the configuration transformers
loaded the model with (``model.hf_quantizer``).  A model quantized otherwise trains and saves, and its merges are
refused with the reason.  As in PEFT, int4 layouts and ``lora_bias`` are refused; DoRA is refused too (PEFT takes
it).
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.adapter_settings import AdapterSettings
from fastlora.layer import LoRALinear
from fastlora.quantized import LoRAQuantizedLinear

__all__ = ["LoRATorchaoLinear", "is_torchao_linear", "torchao_refusal", "give_requantization"]


def _is_torchao_weight(weight) -> bool:
    if not isinstance(weight, torch.Tensor) or type(weight).__module__.split(".")[0] != "torchao":
        return False
    if "torchao" not in sys.modules:  # a torchao tensor exists only where torchao is imported
        return False
    from torchao.utils import TorchAOBaseTensor

    return isinstance(weight, TorchAOBaseTensor)


def is_torchao_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` (not one of fastlora's layers) whose weight is one of torchao's quantized tensors."""
    return (isinstance(module, nn.Linear) and not isinstance(module, LoRALinear)
            and _is_torchao_weight(getattr(module, "weight", None)))


def torchao_refusal(module: nn.Module) -> Optional[str]:
    """Why the torchao Linear ``module`` cannot be adapted (None when it can): one of torchao's int4 layouts
    (``Int4Tensor``, which PEFT refuses, and its packed variants, CUDA-only, whose merges were never checked)."""
    if "Int4" in type(module.weight).__name__:
        return (f"a torchao {type(module.weight).__name__} weight: its int4 layouts are not adapted (PEFT refuses "
                f"them too); load the model with Int8WeightOnlyConfig, or IntxWeightOnlyConfig for int4 values")
    return None


def _requantization(model: nn.Module) -> Optional[Callable[[], object]]:
    """The torchao configuration transformers quantized ``model`` with, as a function PEFT's layers call
    (``hf_quantizer.quantization_config.get_apply_tensor_subclass``), or None where there is none."""
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    return getattr(config, "get_apply_tensor_subclass", None)


def give_requantization(model: nn.Module, layer: nn.Module) -> None:
    """Tell a new torchao layer of ``model`` how to quantize its weight again after a merge (warning, as PEFT does,
    where the model does not say: it then trains, and refuses merges)."""
    if not isinstance(layer, LoRATorchaoLinear) or layer.requantization is not None:
        return
    layer.requantization = _requantization(model)
    if layer.requantization is None:
        warnings.warn("a torchao-quantized layer was adapted on a model that does not record its torchao "
                      "configuration (not loaded by transformers with a TorchAoConfig): forward and training work, "
                      "merging and unmerging are refused. Load the model with "
                      "`from_pretrained(..., quantization_config=TorchAoConfig(...))` to merge.", UserWarning,
                      stacklevel=_callers_level())


def _callers_level() -> int:
    """The ``stacklevel`` that points a warning raised here at the first frame outside fastlora (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


class LoRATorchaoLinear(LoRAQuantizedLinear):
    """y = base_layer(x) + scaling · (dropout(x) Aᵀ) Bᵀ for an ``nn.Linear`` ``base_layer`` whose weight torchao
    quantized (int8, float8, Intx; not its int4 layouts)."""

    #: the torchao configuration's factory for requantizing after a merge (None: merges refused)
    requantization: Optional[Callable[[], object]] = None

    def add_adapter(self, adapter_name: str, settings: AdapterSettings, *, init_lora_weights=True,
                    adapter_dtype: torch.dtype | None = None) -> None:
        if settings.lora_bias:  # PEFT's refusal
            raise ValueError(f"{type(self).__name__} does not support lora_bias yet, set it to False")
        if settings.use_dora:  # PEFT takes it; its norms there are computed in the weight's 16-bit dtype
            raise ValueError("DoRA (use_dora=True) on a torchao-quantized layer is not supported yet: train plain "
                             "LoRA on it, or load the model unquantized for DoRA")
        super().add_adapter(adapter_name, settings, init_lora_weights=init_lora_weights, adapter_dtype=adapter_dtype)

    def check_weight_init(self, init: str, r: int) -> None:
        if init == "loftq":  # (replace_lora_weights_loftq, which the parent's message suggests, reads 4-bit layers)
            raise TypeError("init_lora_weights='loftq' quantizes a full-precision model's weights itself; on a "
                            "torchao-quantized model, create the adapter with another initialisation")
        super().check_weight_init(init, r)

    def _dequantize(self, weight: Tensor) -> Tensor:
        """``weight`` dequantized by torchao: a fresh (out × in) tensor in the dtype it reports."""
        return weight.dequantize()

    def _quantized(self, weight: Tensor, for_the_layer: bool) -> nn.Parameter:
        """``weight`` rounded to the dtype the quantized weight reports and quantized with the model's torchao
        configuration, as PEFT's merge does it (``weight += delta`` rounds the sum, ``torchao.quantize_`` swaps a
        Linear's weight)."""
        from torchao.quantization import quantize_

        old = self.base_layer.weight
        holder = nn.Linear(self.in_features, self.out_features, bias=False, device="meta")
        holder.weight = nn.Parameter(weight.to(device=old.device, dtype=old.dtype), requires_grad=False)
        quantize_(holder, self.requantization())
        return nn.Parameter(holder.weight, requires_grad=False)

    def _storage_refusal(self, merged: Tensor) -> str | None:
        if self.requantization is None:
            return ("the model does not record its torchao configuration (it was not loaded by transformers with a "
                    "TorchAoConfig), so the merged weight cannot be quantized again")
        peak = float(merged.abs().max()) if merged.numel() else 0.0
        if not math.isfinite(peak):
            return "the merged weight holds NaN or Inf"
        dtype = self.base_layer.weight.dtype  # the dtype the sum is rounded to before it is quantized
        if peak > torch.finfo(dtype).max:
            return (f"the merged weight reaches {peak:.4g}, beyond {dtype}'s range ({torch.finfo(dtype).max:.4g}) in "
                    f"which the quantized weight holds it: requantizing would overflow")
        return None

    # PEFT's torchao layers merge without the rounding warning bitsandbytes' layers give
    def merge(self, adapter_names=None, safe_merge: bool = False) -> None:
        LoRALinear.merge(self, adapter_names, safe_merge)

    def unmerge(self) -> None:
        LoRALinear.unmerge(self)

    def quantization_backend(self) -> str:
        return "torchao"

    def adapted_forward(self, x: Tensor, names: list[str]) -> Tensor:
        """base_layer(x) plus each adapter's term computed in the adapters' dtype, summed in the dtype the two
        promote to and rounded once to the base output's, as PEFT's Linear sums them (bitsandbytes' layers round
        each term first)."""
        from fastlora.functional import lora_linear, term_backend

        result = self.base_layer(x)
        out_dtype = result.dtype
        for name in names:
            lora_A, lora_B = self.lora_factors(name)
            settings = self.forward_settings(name)
            result = result + lora_linear(x.to(lora_A.dtype), None, None, lora_A, lora_B, settings.scaling,
                                          settings.lora_dropout, training=self.training,
                                          backend=term_backend(self.backend))
        return result.to(out_dtype)
