"""PEFT's low-level API: :func:`inject_adapter_in_model` puts LoRA layers into any module in place and returns the
module itself, with no ``PeftModel`` around it (the module's ``peft_config`` maps each adapter to its config, as
PEFT records it); :func:`get_peft_model_state_dict` and :func:`set_peft_model_state_dict` take such a module as
well as a ``PeftModel``, its keys relative to the module, as PEFT's.
"""

from __future__ import annotations

import re
import warnings
from typing import Any, Optional

import torch
from torch import nn

from fastlora.config import LoraConfig
from fastlora.layer import LoRALinear
from fastlora.model import PeftModel, lora_model_class, get_peft_model
from fastlora.peft_format import PREFIX, adapted_module_paths, with_model_paths
from fastlora.targets import plan_targets

__all__ = ["inject_adapter_in_model", "get_peft_model_state_dict", "set_peft_model_state_dict"]


def inject_adapter_in_model(peft_config: LoraConfig, model: nn.Module, adapter_name: str = "default",
                            low_cpu_mem_usage: bool = False,
                            state_dict: Optional[dict[str, torch.Tensor]] = None) -> nn.Module:
    """Adapt ``model`` in place as :func:`fastlora.get_peft_model` does, and return ``model`` itself.

    As PEFT's, and unlike ``get_peft_model``: a ``task_type`` adds no task head to ``modules_to_save``, and the
    config records no ``base_model_name_or_path``.  A module already adapted this way takes ``adapter_name`` as a
    further adapter (with PEFT's warning), which becomes the active one in every layer, the other adapters keeping
    their gradient flags and their layers their enabled state, as in PEFT.

    Args:
        peft_config (LoraConfig): the adapter's config.
        model (nn.Module): the module to adapt, changed in place.
        adapter_name (str): the adapter's name.  Default "default".
        low_cpu_mem_usage (bool): accepted for PEFT's signature; the adapters are created at once either way.
        state_dict (dict[str, Tensor] | None): an adapter state dict whose keys (not values) name the modules to
            adapt, exactly, in place of the config's matching rules (for a checkpoint saved without its config);
            PEFT's warning where the two disagree.

    Returns ``model``, its ``peft_config`` mapping each adapter's name to its config.

    PEFT equivalent: ``peft.inject_adapter_in_model``.

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, inject_adapter_in_model
        >>> model = inject_adapter_in_model(LoraConfig(target_modules=["0"]), torch.nn.Sequential(torch.nn.Linear(8, 8)))
        >>> type(model).__name__, type(model[0]).__name__, list(model.peft_config)
        ('Sequential', 'LoRALinear', ['default'])
    """
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"peft_config must be a fastlora.LoraConfig, got {type(peft_config).__name__}")
    # what the layers are built from: no task heads (PEFT adds them in its task models only), the modules a
    # state dict names where one is given
    building = peft_config.replace(task_type=None)
    existing = getattr(model, "peft_config", None)
    if state_dict is not None:
        building = _adapting_what_is_named(building, model, state_dict, adapter_name if existing else None)
    if existing:
        warnings.warn("Already found a `peft_config` attribute in the model. This will lead to having multiple "
                      "adapters in the model. Make sure to know what you are doing!", UserWarning, stacklevel=2)
        adapted = injected_view(model)
        flags = {param: param.requires_grad for param in model.parameters()}
        enabled = {layer: layer.adapter_enabled for layer in model.modules() if isinstance(layer, LoRALinear)}
        adapted.add_adapter(adapter_name, building)
        try:
            adapted.set_adapter(adapter_name)
        except BaseException:
            adapted.delete_adapter(adapter_name)
            raise
        for param, flag in flags.items():  # PEFT's injection leaves the other adapters as they were
            param.requires_grad_(flag)
        for layer, flag in enabled.items():
            layer.adapter_enabled = flag
        adapted.set_requires_grad(adapter_name, not peft_config.inference_mode)
    else:
        adapted = get_peft_model(model, building, adapter_name)
    recorded = adapted.peft_config[adapter_name].replace(
        task_type=peft_config.task_type, base_model_name_or_path=peft_config.base_model_name_or_path,
        **({"target_modules": peft_config.target_modules} if state_dict is not None else {}))
    if existing:
        existing[adapter_name] = recorded
    else:
        model.peft_config = {adapter_name: recorded}
    return model


def _adapting_what_is_named(config: LoraConfig, model: nn.Module, state_dict: dict[str, torch.Tensor],
                            adapter_name: str | None) -> LoraConfig:
    """``config`` adapting exactly the modules an adapter state dict's keys name (``<path>.lora_A.weight``,
    ``<path>.lora_embedding_B``; PEFT's ``base_model.model.`` and a compiled model's ``_orig_mod.`` taken off), as
    PEFT injects from a state dict, with PEFT's warning where the config would have adapted others."""
    if config.target_parameters:
        raise ValueError("Trying to inject a PEFT adapter from a state_dict but the PEFT config uses "
                         "`target_parameters`. This is not supported -- when using `target_parameters`, please inject "
                         "the adapter without the state_dict.")
    names = sorted({path.removeprefix("_orig_mod.")
                    for path in adapted_module_paths(with_model_paths(model, state_dict))})
    if not names:
        raise ValueError("inject_adapter_in_model(state_dict=...): no key of the state dict names a LoRA factor "
                         "(<module>.lora_A.weight, ...)")
    if config.target_modules is not None:
        try:
            by_config = set(plan_targets(model, config, adapter_name))
        except (ValueError, TypeError):  # the config alone matches nothing adaptable: the state dict decides
            by_config = set()
        extra_config, extra_state = sorted(by_config - set(names)), sorted(set(names) - by_config)
        if extra_config or extra_state:
            warnings.warn("While injecting the PEFT adapters, an inconsistency was discovered between the PEFT config "
                          "and the provided state_dict. This is not necessarily an issue and can be ignored if this "
                          "was the intent. "
                          + (f"The PEFT config contained these additional target modules: {extra_config}. "
                             if extra_config else "")
                          + (f"The state_dict contained these additional target modules: {extra_state}. "
                             if extra_state else ""), RuntimeWarning, stacklevel=3)
    return config.replace(target_modules="|".join(f"(?:{re.escape(name)})" for name in names), exclude_modules=None,
                          layers_to_transform=None, layers_pattern=None)


def injected_view(model: nn.Module) -> PeftModel:
    """A ``PeftModel`` over a module :func:`inject_adapter_in_model` adapted: its adapters' configs and active
    adapters (the module is wrapped, not changed)."""
    configs = getattr(model, "peft_config", None)
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not (isinstance(configs, dict) and configs and all(isinstance(c, LoraConfig) for c in configs.values())
            and layers):
        raise ValueError(f"{type(model).__name__} holds no adapter fastlora made: adapt it with "
                         f"fastlora.get_peft_model or fastlora.inject_adapter_in_model")
    first = next(iter(configs))
    view = lora_model_class()(model, configs[first], first)
    view.peft_config = dict(configs)
    view._active_adapters = list(layers[0].active_adapters)
    return view


def get_peft_model_state_dict(model, state_dict: Optional[dict[str, torch.Tensor]] = None, adapter_name: str = "default",
                              unwrap_compiled: bool = False, save_embedding_layers: Any = "auto") -> dict[str, torch.Tensor]:
    """PEFT's ``get_peft_model_state_dict`` for a fastlora model: the adapter's tensors under the keys of PEFT's
    adapter file (``base_model.model.<path>.lora_A.weight``, ...; ``<path>.lora_A.weight`` for a module
    :func:`inject_adapter_in_model` adapted, as PEFT's).  With ``state_dict`` the values come from it.

    Args:
        model (PeftModel | nn.Module): the fastlora model (from :func:`fastlora.get_peft_model` or
            ``PeftModel.from_pretrained``), or a module :func:`inject_adapter_in_model` adapted.
        state_dict (dict[str, Tensor] | None): a state dict of this model (e.g. one gathered by FSDP or
            DeepSpeed) to take the values from; None: the model's own parameters, returned as they are (not
            copies).
        adapter_name (str): the adapter whose tensors are returned.  Default "default".
        unwrap_compiled (bool): ``model`` is a ``torch.compile`` wrapper: use the model it wraps.  Default False.
        save_embedding_layers (bool | str): the embedding tables too: the targeted ones
            (``<path>.base_layer.weight``) where target_modules names ``embed_tokens`` / ``lm_head``, else the
            model's input and output embeddings (a vocabulary resized before fine-tuning).  True, or "auto":
            where target_modules names an embedding or ``config.vocab_size`` differs from the base checkpoint's
            (PEFT's rule).  Default "auto".

    Returns a dict of PEFT's file keys to tensors: the LoRA factors, DoRA magnitudes, ``modules_to_save``
    copies and trained biases of the adapter.

    PEFT equivalent: ``peft.get_peft_model_state_dict`` (PEFT's own selects tensors by PEFT's layer
    classes, so it finds nothing in a fastlora model).

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, get_peft_model, get_peft_model_state_dict
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), LoraConfig(target_modules=["0"]))
        >>> sorted(get_peft_model_state_dict(model))
        ['base_model.model.0.lora_A.weight', 'base_model.model.0.lora_B.weight']
    """
    if unwrap_compiled:
        model = getattr(model, "_orig_mod", model)
    if isinstance(model, PeftModel):
        return model.adapter_tensors(adapter_name, state_dict, save_embedding_layers)
    tensors = injected_view(model).adapter_tensors(adapter_name, state_dict, save_embedding_layers)
    return {key.removeprefix(PREFIX): tensor for key, tensor in tensors.items()}


def set_peft_model_state_dict(model, peft_model_state_dict: dict[str, torch.Tensor], adapter_name: str = "default",
                              ignore_mismatched_sizes: bool = False, low_cpu_mem_usage: bool = False):
    """PEFT's ``set_peft_model_state_dict`` for a fastlora model: copy an adapter state dict (PEFT's file keys,
    with or without the ``base_model.model.`` prefix) into the existing adapter ``adapter_name``.  As PEFT's,
    it is not strict and returns ``(missing_keys, unexpected_keys)``; a wrong shape raises ValueError (or
    is skipped with a warning with ``ignore_mismatched_sizes=True``), before any value changes.

    Args:
        model (PeftModel | nn.Module): the fastlora model that already holds the adapter ``adapter_name``, or a
            module :func:`inject_adapter_in_model` adapted.
        peft_model_state_dict (dict[str, Tensor]): the adapter's tensors under PEFT's file keys (as
            :func:`get_peft_model_state_dict` returns them, or read from a PEFT ``adapter_model.safetensors``).
        adapter_name (str): the existing adapter that receives the values.  Default "default".
        ignore_mismatched_sizes (bool): skip tensors of the wrong shape with a warning instead of raising
            ValueError.  Default False.
        low_cpu_mem_usage (bool): accepted for PEFT's signature; the values are copied into the existing
            parameters either way.  Default False.

    Returns ``(missing_keys, unexpected_keys)``, a named tuple as ``nn.Module.load_state_dict`` returns.

    PEFT equivalent: ``peft.set_peft_model_state_dict``.

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 16)), LoraConfig(target_modules=["0"]))
        >>> tensors = {key: torch.ones_like(t) for key, t in get_peft_model_state_dict(model).items()}
        >>> set_peft_model_state_dict(model, tensors)
        <All keys matched successfully>
        >>> bool((model.base_model.model[0].lora_B == 1).all())
        True
    """
    if isinstance(model, PeftModel):
        return model.load_adapter_tensors(peft_model_state_dict, adapter_name, ignore_mismatched_sizes)
    result = injected_view(model).load_adapter_tensors(peft_model_state_dict, adapter_name, ignore_mismatched_sizes)
    return type(result)([key.removeprefix(PREFIX) for key in result.missing_keys],
                        [key.removeprefix(PREFIX) for key in result.unexpected_keys])
