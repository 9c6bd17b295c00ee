"""PEFT's troubleshooting views of an adapted model: each adapter layer's state (:func:`get_layer_status`) and the
model's in one summary (:func:`get_model_status`), with PEFT's fields, so that a model left in an inconsistent
state (adapters active, merged or trainable in some layers only) shows as "irregular".

A layer is a LoRA layer (``LoRALinear`` and its kinds), a ``modules_to_save`` wrapper, or a table with trainable
token rows (and a head tied to it, sharing them); names are PEFT's (``model.<path>``, or ``<path>`` on a module
adapted in place, the trainable-token layer as ``<path>.token_adapter``).  One difference: a quantized layer
names its quantization backend ("bnb 4bit", "bnb 8bit", "torchao"), where PEFT's LoRA layers report None.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Union

from torch import nn

from fastlora.layer import LoRALinear
from fastlora.model_card import is_transformers_model
from fastlora.modules_to_save import ModulesToSaveWrapper
from fastlora.quantized import LoRAQuantizedLinear
from fastlora.trainable_tokens import TrainableTokensWrapper

__all__ = ["TunerLayerStatus", "TunerModelStatus", "get_layer_status", "get_model_status"]

Irregular = Literal["irregular"]


@dataclasses.dataclass
class TunerLayerStatus:
    """One adapter layer: PEFT's ``TunerLayerStatus``."""

    name: str
    module_type: str
    enabled: bool
    active_adapters: list[str]
    merged_adapters: list[str]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: str | None


@dataclasses.dataclass
class TunerModelStatus:
    """The whole model: PEFT's ``TunerModelStatus``."""

    base_model_type: str
    adapter_model_type: str
    peft_types: dict[str, str]
    trainable_params: int
    total_params: int
    num_adapter_layers: int
    enabled: Union[bool, Irregular]
    active_adapters: Union[list[str], Irregular]
    merged_adapters: Union[list[str], Irregular]
    requires_grad: dict[str, Union[bool, Irregular]]
    available_adapters: list[str]
    devices: dict[str, list[str]]
    quantization_backend: Union[str, None, Irregular]


def _all_or_none(values) -> Union[bool, Irregular]:
    values = list(values)
    return True if all(values) else False if not any(values) else "irregular"


def _layer_parts(module: nn.Module):
    """(PEFT's name suffix, type, enabled, active, merged, {adapter: its parameters}, quantization backend), or None
    for a module that is not an adapter layer (a tied head's token wrapper is its owner's)."""
    if isinstance(module, LoRALinear):
        backend = module.quantization_backend() if isinstance(module, LoRAQuantizedLinear) else None
        return ("", type(module).__name__, module.adapter_enabled, list(module.active_adapters),
                [*module.merged_adapters, *module.merged_by_owner()],
                {n: module.adapter_tensors(n) for n in module.adapter_names}, backend)
    if isinstance(module, ModulesToSaveWrapper):  # the active adapter that holds a copy, as PEFT's wrapper keeps it
        active = [module.active_adapter] if module.active_adapter in module.modules_to_save else []
        return ("", "ModulesToSaveWrapper", module.adapter_enabled, active, [],
                {n: list(copy.parameters()) for n, copy in module.modules_to_save.items()}, None)
    if isinstance(module, TrainableTokensWrapper):  # a tied head's shares its owner's rows, listed as PEFT lists it
        return (".token_adapter", "TrainableTokensLayer", module.adapter_enabled,
                [n for n in module.active_adapters if n in module.token_indices],
                list(module.merged_adapters), {n: [module.delta(n)] for n in module.adapter_names}, None)
    return None


def get_layer_status(model: nn.Module) -> list[TunerLayerStatus]:
    """The state of each adapter layer of ``model`` (a fastlora ``PeftModel``, or a model adapted in place).

    Args:
        model (nn.Module): the adapted model.

    Returns a list of :class:`TunerLayerStatus`, one per adapter layer; raises ValueError where there is none.

    PEFT equivalent: ``peft.get_layer_status`` (and ``PeftModel.get_layer_status``).

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, get_layer_status, get_peft_model
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(target_modules=["0"]))
        >>> [(s.name, s.active_adapters, s.requires_grad) for s in get_layer_status(model)]
        [('model.0', ['default'], {'default': True})]
    """
    wrapped = hasattr(model, "get_base_model")
    base = model.get_base_model() if wrapped else model
    prefix = "model." if wrapped else ""  # PEFT names layers from its LoraModel, or from a model adapted in place
    out = []
    for name, module in base.named_modules():
        parts = _layer_parts(module)
        if parts is None:
            continue
        suffix, module_type, enabled, active, merged, parameters, backend = parts
        out.append(TunerLayerStatus(
            name=f"{prefix}{name}{suffix}", module_type=module_type, enabled=enabled, active_adapters=active,
            merged_adapters=merged,
            requires_grad={adapter: _all_or_none(p.requires_grad for p in params) for adapter, params in parameters.items()},
            available_adapters=sorted(parameters),
            devices={adapter: sorted({p.device.type for p in params}) for adapter, params in parameters.items()},
            quantization_backend=backend))
    if not out:
        raise ValueError("No adapter layers found in the model, please ensure that it's a PEFT model or that you have "
                         "PEFT adapters injected in the model.")
    return out


def get_model_status(model: nn.Module) -> TunerModelStatus:
    """A summary of :func:`get_layer_status` over the whole model, "irregular" where the layers disagree.

    Args:
        model (nn.Module): the adapted model.

    Returns a :class:`TunerModelStatus`.

    PEFT equivalent: ``peft.get_model_status`` (and ``PeftModel.get_model_status``).

    Example:
        >>> import torch
        >>> from fastlora import LoraConfig, get_model_status, get_peft_model
        >>> model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(target_modules=["0"]))
        >>> status = get_model_status(model)
        >>> status.num_adapter_layers, status.active_adapters, status.trainable_params
        (1, ['default'], 128)
    """
    layers = get_layer_status(model)
    if hasattr(model, "get_base_model"):
        base_model_type, adapter_model_type = type(model.get_base_model()).__name__, "LoraModel"
        configs = model.peft_config
    else:  # adapted in place (inject_adapter_in_model): PEFT names no adapter model or types here
        base_model_type = type(model).__name__ if is_transformers_model(model) else "other"
        adapter_model_type, configs = "None", {}
    params = list(model.parameters())
    counts = model.get_nb_trainable_parameters() if hasattr(model, "get_nb_trainable_parameters") else (
        sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
    enabled = {status.enabled for status in layers}
    active = {tuple(status.active_adapters) for status in layers}
    merged = sorted({name for status in layers for name in status.merged_adapters})
    merged_everywhere = all(not (set(status.available_adapters) - set(status.merged_adapters)) & set(merged)
                            for status in layers)
    grads: dict[str, list] = {}
    devices: dict[str, set] = {}
    for status in layers:
        for adapter, flag in status.requires_grad.items():
            grads.setdefault(adapter, []).append(flag)
        for adapter, kinds in status.devices.items():
            devices.setdefault(adapter, set()).update(kinds)
    backends = {status.quantization_backend for status in layers}
    return TunerModelStatus(
        base_model_type=base_model_type, adapter_model_type=adapter_model_type,
        peft_types={name: "LORA" for name in configs}, trainable_params=counts[0], total_params=counts[1],
        num_adapter_layers=len(layers), enabled=enabled.pop() if len(enabled) == 1 else "irregular",
        active_adapters=list(active.pop()) if len(active) == 1 else "irregular",
        merged_adapters=merged if merged_everywhere else "irregular",
        requires_grad={adapter: (flags[0] if len(set(flags)) == 1 else "irregular") for adapter, flags in grads.items()},
        available_adapters=sorted({name for status in layers for name in status.available_adapters}),
        devices={adapter: sorted(kinds) for adapter, kinds in devices.items()},
        quantization_backend=backends.pop() if len(backends) == 1 else "irregular")
