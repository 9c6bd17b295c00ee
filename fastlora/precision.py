"""``cast_mixed_precision_params``: the frozen parameters in half precision, the trained ones in float32, for
automatic mixed-precision training (PEFT's helper of the same name)."""

from __future__ import annotations

import torch
from torch import nn

from fastlora.layer import LoRALinear

__all__ = ["cast_mixed_precision_params"]


def cast_mixed_precision_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast every frozen floating-point parameter of ``model`` to ``dtype`` and every trained one to float32, in
    place; a factor an adapter keeps frozen (MiCA's B) follows its trained factor.  Quantized weights
    (bitsandbytes' packed codes, int8 rows) are left as they are: casting them would destroy them.

    Args:
        model (nn.Module): the model (an adapted one: its adapters are the trained parameters).
        dtype (torch.dtype): ``torch.float16`` or ``torch.bfloat16``, as the mixed-precision training uses.

    PEFT equivalent: ``peft.cast_mixed_precision_params`` (which casts quantized weights too, and a MiCA B to
    ``dtype``, so that its forward pass then fails).

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, cast_mixed_precision_params, get_peft_model
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(target_modules=["0"]))
        >>> cast_mixed_precision_params(model, torch.bfloat16)
        >>> model.base_model.model[0].weight.dtype, model.base_model.model[0].lora_A.dtype
        (torch.bfloat16, torch.float32)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"cast_mixed_precision_params: dtype must be a floating-point torch.dtype (torch.float16 or "
                        f"torch.bfloat16), got {dtype!r}; the model is unchanged")
    for param in model.parameters():
        if not param.is_floating_point() or type(param) is not nn.Parameter and type(param).__module__.startswith(
                "bitsandbytes"):
            continue
        param.data = param.data.to(torch.float32 if param.requires_grad else dtype)
    for module in model.modules():  # a frozen factor beside a trained one (MiCA's B) computes in A's dtype
        if isinstance(module, LoRALinear):
            for name, settings in module.adapter_settings.items():
                if settings.frozen_lora_B:
                    lora_A, lora_B = module.lora_factors(name)
                    lora_B.data = lora_B.data.to(lora_A.dtype)
