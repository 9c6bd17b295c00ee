"""``replace_lora_weights_loftq``: LoftQ factors for an adapter already on a 4-bit model, from the full-precision
weights in the model's safetensors checkpoint (PEFT's function of the same name).

For each 4-bit layer holding the adapter, with W the checkpoint's weight and Q the layer's dequantized weight, the
factors become the best rank-r approximation of W − Q (B = U_r √S_r, A = √S_r V_rᵀ, without the adapter's scaling,
as PEFT; :func:`fastlora.weight_inits.quantization_error_factors`): the adapter starts by correcting the
quantization error.  The quantized weight is kept.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from fastlora import hub
from fastlora.quantized import LoRAQuantizedLinear
from fastlora.weight_inits import quantization_error_factors

__all__ = ["replace_lora_weights_loftq"]

_SINGLE = "model.safetensors"
_INDEX = "model.safetensors.index.json"


@torch.no_grad()
def replace_lora_weights_loftq(peft_model, model_path: Optional[str] = None, adapter_name: str = "default",
                               callback: Optional[Callable[[nn.Module, str], bool]] = None) -> None:
    """Give ``adapter_name``'s factors on every bitsandbytes 4-bit layer LoftQ's values (see the module docstring).

    Args:
        peft_model (PeftModel): a fastlora model of a 4-bit base (bitsandbytes ``Linear4bit`` targets).
        model_path (str | None): the checkpoint's ``model.safetensors`` file, or the directory holding it (or a
            sharded checkpoint's ``model.safetensors.index.json`` and shards); None: the base model's
            ``name_or_path``, a directory or a Hub repository in the local cache.
        adapter_name (str): the adapter whose factors are replaced.  Default "default".
        callback (callable | None): called as ``callback(peft_model, module_name)`` after each layer's factors
            are replaced; returning False puts that layer's previous factors back (PEFT's greedy check, e.g.
            comparing logits with the full-precision model's).

    Raises:
        ValueError: no 4-bit layer holds the adapter, or the checkpoint cannot be found or lacks a weight.

    PEFT equivalent: ``peft.replace_lora_weights_loftq``.

    Example:
        >>> from fastlora import LoraConfig, get_peft_model, replace_lora_weights_loftq
        >>> model = get_peft_model(model_4bit, LoraConfig(target_modules=["q_proj", "v_proj"]))  # doctest: +SKIP
        >>> replace_lora_weights_loftq(model)  # the checkpoint model_4bit was loaded from  # doctest: +SKIP
    """
    layers = [(name, layer) for name, layer in peft_model.lora_layers(adapter_name)
              if isinstance(layer, LoRAQuantizedLinear) and layer.quantization_backend() == "bnb 4bit"]
    if not layers:
        raise ValueError("No bnb LoRA module found on the model")
    if any(config.layer_replication for config in peft_model.peft_config.values()):
        raise ValueError("replace_lora_weights_loftq on a model whose layers are replicated (layer_replication): the "
                         "checkpoint names the original layers, not the copies; nothing was replaced")
    read = _checkpoint_reader(peft_model.get_base_model(), model_path)
    for name, layer in layers:
        weight = read(f"{name}.weight").to(device=layer.base_layer.weight.device, dtype=torch.float32)
        expected = (layer.out_features, layer.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(f"the checkpoint's {name}.weight has shape {tuple(weight.shape)}, the layer {expected}")
        A, B = quantization_error_factors(weight - layer.base_weight().to(torch.float32),
                                          layer.adapter_settings[adapter_name].r)
        lora_A, lora_B = layer.lora_factors(adapter_name)
        before = (lora_A.clone(), lora_B.clone()) if callback is not None else None
        lora_A.copy_(A)
        lora_B.copy_(B)
        if callback is not None and not callback(peft_model, name):
            lora_A.copy_(before[0])
            lora_B.copy_(before[1])


def _checkpoint_reader(model: nn.Module, model_path: Optional[str]) -> Callable[[str], torch.Tensor]:
    """A function from a module's parameter name to its tensor in the model's safetensors checkpoint (single or
    sharded; keys with or without the model's ``base_model_prefix``)."""
    from safetensors import safe_open

    files = _checkpoint_files(model, model_path)
    prefix = getattr(model, "base_model_prefix", None)

    def read(key: str) -> torch.Tensor:
        candidates = [key] + ([key[len(prefix) + 1:]] if prefix and key.startswith(prefix + ".") else [])
        for candidate in candidates:
            path = files.get(candidate, files.get(None))
            if path is None:
                continue
            with safe_open(str(path), framework="pt", device="cpu") as f:
                if candidate in f.keys():
                    return f.get_tensor(candidate)
        raise ValueError(f"the model's checkpoint has no tensor {key!r}")

    return read


def _checkpoint_files(model: nn.Module, model_path: Optional[str]) -> dict:
    """Tensor name → its shard, or {None: the single file}."""
    where = model_path if model_path is not None else getattr(getattr(model, "config", None), "_name_or_path", None)
    if not where:
        raise ValueError("The provided model does not appear to be a transformers model or is a local model. In this "
                         "case, you must pass the model_path argument that points to the safetensors file.")
    where = os.fspath(where)
    if where.endswith(".safetensors") and Path(where).is_file():
        return {None: Path(where)}
    try:
        single = hub.resolve_file(where, _SINGLE, local_files_only=True, missing_ok=True)
        index = None if single is not None else hub.resolve_file(where, _INDEX, local_files_only=True, missing_ok=True)
    except ValueError:
        single = index = None
    if single is not None:
        return {None: single}
    if index is None:
        raise ValueError(f"no safetensors checkpoint of the model at {where!r}: LoftQ reads the full-precision weights "
                         f"from a model.safetensors file, or a directory (or a Hub repository in the local cache) "
                         f"holding one or a sharded model.safetensors.index.json"
                         + ("; pass model_path=" if model_path is None else ""))
    weight_map = json.loads(Path(index).read_text())["weight_map"]
    shards = {shard: hub.resolve_file(where, shard, local_files_only=True) for shard in set(weight_map.values())}
    return {key: shards[shard] for key, shard in weight_map.items()}
