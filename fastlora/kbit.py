"""``prepare_model_for_kbit_training``: ready a 4-bit or 8-bit (bitsandbytes) transformers model for QLoRA, as
PEFT's function of that name does, so a PEFT QLoRA script runs with only the import changed."""

from __future__ import annotations

import warnings

import torch
from torch import nn

__all__ = ["prepare_model_for_kbit_training"]

_HALF = (torch.float16, torch.bfloat16)


def prepare_model_for_kbit_training(model: nn.Module, use_gradient_checkpointing: bool = True,
                                    gradient_checkpointing_kwargs: dict | None = None,
                                    auto_clear_cache: bool = True) -> nn.Module:
    """Freeze every parameter, keep the non-quantized float16 / bfloat16 parameters (norms, embeddings, the head)
    in float32, and for a model loaded in 4 or 8 bits with ``use_gradient_checkpointing`` turn on gradient
    checkpointing, making the input embeddings' output require grad unless ``use_reentrant=False`` is asked for
    (reentrant checkpointing needs an input that requires grad).  Returns ``model``, changed in place.

    Args:
        model (nn.Module): a transformers model, typically loaded with ``BitsAndBytesConfig(load_in_4bit=True)``.
        use_gradient_checkpointing (bool): turn on gradient checkpointing (quantized models only).  Default True.
        gradient_checkpointing_kwargs (dict | None): passed to ``model.gradient_checkpointing_enable``, e.g.
            ``{"use_reentrant": False}``.
        auto_clear_cache (bool): empty the CUDA allocator's cache after the float32 casts.  Default True.

    PEFT equivalent: ``peft.prepare_model_for_kbit_training``.

    Example:
        >>> import torch
        >>> from fastlora import prepare_model_for_kbit_training
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4, dtype=torch.bfloat16))
        >>> prepare_model_for_kbit_training(model)[0].weight.dtype, model[0].weight.requires_grad
        (torch.float32, False)
    """
    if gradient_checkpointing_kwargs is not None and not isinstance(gradient_checkpointing_kwargs, dict):
        raise TypeError(f"gradient_checkpointing_kwargs must be a dict (as {{'use_reentrant': False}}) or None, got "
                        f"{gradient_checkpointing_kwargs!r}")
    kwargs = dict(gradient_checkpointing_kwargs or {})
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.parameters():
        if param.dtype in _HALF and type(param).__name__ != "Params4bit":
            param.data = param.data.to(torch.float32)
    if auto_clear_cache and torch.cuda.is_available():
        torch.cuda.empty_cache()
    quantized = getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False)
    if quantized and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):
            if hasattr(model, "enable_input_require_grads"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(lambda module, args, output:
                                                                   output.requires_grad_(True))
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model
