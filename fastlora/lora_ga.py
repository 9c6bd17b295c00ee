"""LoRA-GA's data-driven step: estimate the gradient of each target's full weight, before ``get_peft_model``.

:func:`preprocess_loraga` runs the caller's training step with only the target weights requiring gradients and
leaves each target module holding the mean gradient G (``module._peft_loraga_grad``, PEFT's attribute, so PEFT's
step and fastlora's are interchangeable).  ``get_peft_model`` with ``init_lora_weights="lora_ga"`` then starts each
of those layers from G's leading singular directions (:func:`fastlora.weight_inits.lora_ga_factors`) and drops it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from fastlora.config import LoraConfig
from fastlora.files import save_tensors, saved_tensors
from fastlora.module_modes import in_mode
from fastlora.targets import full_precision_linear_targets

__all__ = ["preprocess_loraga", "GRADIENT_ATTRIBUTE", "lora_ga_gradients"]

GRADIENT_ATTRIBUTE = "_peft_loraga_grad"


def lora_ga_gradients(modules: dict[str, nn.Module]) -> dict[str, Tensor]:
    """Name → the gradient :func:`preprocess_loraga` left on that module, for the modules holding one."""
    return {name: getattr(module, GRADIENT_ATTRIBUTE) for name, module in modules.items()
            if isinstance(getattr(module, GRADIENT_ATTRIBUTE, None), Tensor)}


@torch.no_grad()
def preprocess_loraga(model: nn.Module, lora_config: LoraConfig, train_step: Callable[[], None],
                      cache_file: Optional[str | os.PathLike] = None) -> None:
    """Estimate, for each Linear / Conv1D layer ``lora_config`` targets, the gradient of the loss with respect to
    its full weight, for ``get_peft_model(model, lora_config)`` with ``init_lora_weights="lora_ga"`` to start from.

    ``train_step()`` runs forward and backward passes (as many as it likes; gradients accumulate, and each layer's
    sum is divided by the number of backward passes through it).  Only the target weights require gradients
    meanwhile, the model is in training mode; requires_grad flags, the training mode and the target weights'
    ``.grad`` are put back afterwards, also when ``train_step`` raises.  A layer no backward pass reached keeps no
    gradient (and starts as ``init_lora_weights=True``, with a warning).  On a model that already has adapters the
    target weights are fastlora's layers' (refused: estimate before the first ``get_peft_model``, as in PEFT).

    Args:
        model (nn.Module): the model, not yet adapted, in full precision (quantized layers are refused).
        lora_config (LoraConfig): the config ``get_peft_model`` will get; ``lora_ga_config`` must be set.
        train_step (Callable[[], None]): runs the forward and backward passes.
        cache_file (str | PathLike | None): where the gradients are kept (PEFT's format: a ``torch.save`` of
            ``{"<module name>._peft_loraga_grad": tensor}``): read when the file exists and is not empty, otherwise
            written after the estimate (atomically).  Default None.

    PEFT equivalent: ``peft.preprocess_loraga``.

    Example:
        >>> from fastlora import LoraConfig, LoraGAConfig, get_peft_model, preprocess_loraga
        >>> config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights="lora_ga",
        ...                     lora_ga_config=LoraGAConfig())
        >>> def train_step():
        ...     for batch in batches:
        ...         model(**batch).loss.backward()
        >>> preprocess_loraga(model, config, train_step)  # doctest: +SKIP
        >>> model = get_peft_model(model, config)  # doctest: +SKIP
    """
    if lora_config.lora_ga_config is None:
        raise ValueError("If you want to use LoRA-GA, please initialize the LoraConfig with "
                         "init_lora_weights='lora_ga' and lora_ga_config=LoraGAConfig(...).")
    modules = full_precision_linear_targets(model, lora_config, "LoRA-GA")
    cache = saved_tensors(cache_file, next(iter(modules.values())).weight.device)
    if cache is not None:
        _from_cache(cache, str(cache_file), modules)
        return
    _estimate(model, modules, train_step)
    if cache_file is not None:
        save_tensors(cache_file, {f"{name}.{GRADIENT_ATTRIBUTE}": gradient
                                  for name, gradient in lora_ga_gradients(modules).items()})


def _from_cache(cache: dict, path: str, modules: dict[str, nn.Module]) -> None:
    held = {name: module for name, module in modules.items() if f"{name}.{GRADIENT_ATTRIBUTE}" in cache}
    if not held:
        raise ValueError(f"the LoRA-GA cache file {path!r} holds no gradient for any of the target modules "
                         f"({list(modules)[:3]}...): it was written for other ones (delete it to estimate the "
                         f"gradients again)")
    wrong = [name for name, module in held.items()
             if cache[f"{name}.{GRADIENT_ATTRIBUTE}"].shape != module.weight.shape]
    if wrong:
        raise ValueError(f"the LoRA-GA cache file {path!r} holds gradients of other shapes than the weights of "
                         f"{wrong[:3]}: it was written for another model")
    for name, module in held.items():
        setattr(module, GRADIENT_ATTRIBUTE, cache[f"{name}.{GRADIENT_ATTRIBUTE}"])
    _warn_of_layers_without_gradient([name for name in modules if name not in held])


def _estimate(model: nn.Module, modules: dict[str, nn.Module], train_step: Callable[[], None]) -> None:
    """Run ``train_step`` with only the target weights requiring gradients; leave each reached module its mean
    gradient, and everything else as it was."""
    flags = {param: param.requires_grad for param in model.parameters()}
    earlier_grads = {name: module.weight.grad for name, module in modules.items()}
    passes = dict.fromkeys(modules, 0)

    def counter(name: str):
        def count(module, grad_input, grad_output) -> None:
            passes[name] += 1
        return count

    hooks = []
    try:
        for param in flags:
            param.requires_grad_(False)
        for name, module in modules.items():
            module.weight.grad = None
            module.weight.requires_grad_(True)
            hooks.append(module.register_full_backward_hook(counter(name)))
        with in_mode(model, training=True), torch.enable_grad(), warnings.catch_warnings():
            # the counting hooks fire where no input of a layer requires gradients (only its weight does), as meant
            warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")
            train_step()
        gradients = {name: module.weight.grad.detach() / passes[name] for name, module in modules.items()
                     if passes[name] and module.weight.grad is not None}
    finally:
        for hook in hooks:
            hook.remove()
        for name, module in modules.items():
            module.weight.grad = earlier_grads[name]
        for param, flag in flags.items():
            param.requires_grad_(flag)
    for name, gradient in gradients.items():
        setattr(modules[name], GRADIENT_ATTRIBUTE, gradient)
    _warn_of_layers_without_gradient([name for name in modules if name not in gradients])


def _warn_of_layers_without_gradient(names: list[str]) -> None:
    if names:
        warnings.warn(f"preprocess_loraga: no gradient for {names[:3]}{' and more' if len(names) > 3 else ''} (no "
                      f"backward pass of train_step reached them); without one, those layers start as "
                      f"init_lora_weights=True", UserWarning, stacklevel=4)
