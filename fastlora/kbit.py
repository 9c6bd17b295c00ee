"""``prepare_model_for_kbit_training``: ready a 4-bit or 8-bit (bitsandbytes) transformers model for QLoRA, as
PEFT's function of that name does, so a PEFT QLoRA script runs with only the import changed."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training"]

_HALF = (torch.float16, torch.bfloat16)
# models transformers quantized with these libraries: PEFT leaves their parameters in the dtypes they were loaded in
_KEPT_AS_LOADED = ("gptq", "aqlm", "eetq", "hqq", "torchao")


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    activation_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True, *,
                                    gradient_checkpointing_kwargs: dict | None = None) -> nn.Module:
    """Freeze every parameter, keep the non-quantized float16 / bfloat16 parameters (norms, embeddings, the head)
    in float32 (a model transformers quantized with torchao, GPTQ, AQLM, EETQ or HQQ keeps its dtypes, as in PEFT),
    and for a quantized model with ``use_gradient_checkpointing`` turn on activation
    checkpointing (transformers' default kind unless the kwargs ask for another: non-reentrant since transformers
    5.23, reentrant before), making the input embeddings' output require grad for the reentrant kind (it needs an
    input that requires grad).  Returns ``model``, changed in place.

    Args:
        model (nn.Module): a transformers model, typically loaded with ``BitsAndBytesConfig(load_in_4bit=True)``.
        use_gradient_checkpointing (bool): turn on activation checkpointing (quantized models only).  Default True.
        activation_checkpointing_kwargs (dict | None): passed to ``torch.utils.checkpoint.checkpoint`` through
            transformers' ``activation_checkpointing_enable``, e.g. ``{"use_reentrant": False}``.
        auto_clear_cache (bool): empty the CUDA allocator's cache after the float32 casts.  Default True.
        gradient_checkpointing_kwargs (dict | None): the same, under PEFT 0.21's name (keyword only; not both).

    PEFT equivalent: ``peft.prepare_model_for_kbit_training``.

    Example:
        >>> import torch
        >>> from fastlora import prepare_model_for_kbit_training
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> prepare_model_for_kbit_training(model)[0].weight.dtype, model[0].weight.requires_grad
        (torch.float32, False)
    """
    for name, value in (("activation_checkpointing_kwargs", activation_checkpointing_kwargs),
                        ("gradient_checkpointing_kwargs", gradient_checkpointing_kwargs)):
        if value is not None and not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict (as {{'use_reentrant': False}}) or None, got {value!r}")
    if activation_checkpointing_kwargs and gradient_checkpointing_kwargs:
        raise ValueError("activation_checkpointing_kwargs and gradient_checkpointing_kwargs are one setting under two "
                         "names: give one")
    kwargs = activation_checkpointing_kwargs or gradient_checkpointing_kwargs
    kwargs = None if kwargs is None else dict(kwargs)
    for param in model.parameters():
        param.requires_grad_(False)
    # other libraries' quantized models (torchao's, GPTQ's, ...) keep every dtype as loaded, as in PEFT
    kept_as_loaded = getattr(model, "quantization_method", None) in _KEPT_AS_LOADED or getattr(
        model, "hqq_quantized", False)
    if not kept_as_loaded:
        for param in model.parameters():
            if param.dtype in _HALF and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
        if auto_clear_cache and torch.cuda.is_available():
            torch.cuda.empty_cache()
    quantized = (getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
                 or kept_as_loaded)
    if quantized and use_gradient_checkpointing:
        # transformers' own default: non-reentrant since activation_checkpointing_enable (5.23), reentrant before
        new_name = hasattr(model, "activation_checkpointing_enable")
        if (kwargs or {}).get("use_reentrant", not new_name):
            if hasattr(model, "enable_input_require_grads"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda module, args, output:
                                                                   output.requires_grad_(True))
        if new_name:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
